from dagster import DynamicPartitionsDefinition

# One partition per data drop; the drop sensor adds them as folders arrive.
drops_partitions = DynamicPartitionsDefinition(name="drops")
