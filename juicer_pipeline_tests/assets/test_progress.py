"""Progress lines of long per-batch loops are throttled, so a large drop does not flood the event log."""
from juicer_pipeline.assets import progress as progress_module
from juicer_pipeline.assets.progress import ThrottledProgress


def test_a_progress_line_at_most_every_few_seconds_and_built_only_when_logged(monkeypatch):
    clock = iter([0.0, 1.0, 4.9, 5.0, 6.0, 10.5, 10.6])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(progress_module, "resident_mb", lambda: None)
    lines, built = [], []
    progress = ThrottledProgress(lines.append, every_s=5.0)  # created at t=0

    def message(i):
        def build():
            built.append(i)
            return f"batch {i}"
        return build

    for i in range(6):  # at t = 1.0, 4.9, 5.0, 6.0, 10.5, 10.6
        progress(message(i))
    assert lines == ["batch 2", "batch 4"] and built == [2, 4]


def test_a_progress_line_ends_with_the_resident_memory(monkeypatch):
    clock = iter([0.0, 6.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    lines = []
    ThrottledProgress(lines.append, every_s=5.0)(lambda: "64 images scored")
    rss = progress_module.resident_mb()
    assert rss is not None and 10 < rss < 100_000  # this test process's own memory, in MB
    assert lines[0].startswith("64 images scored (RSS ") and lines[0].endswith(" MB)")
