"""Sensors, schedules and automation conditions."""
