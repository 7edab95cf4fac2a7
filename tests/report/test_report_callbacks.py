import io

from rich.console import Console

from coevo.report import Callback, CallbackList, RichProgress


class Recorder(Callback):
    def __init__(self, name, events):
        self.name = name
        self.events = events

    def on_run_start(self, run):
        self.events.append((self.name, "run_start"))

    def on_round_end(self, record):
        self.events.append((self.name, "round_end", record["round"]))

    def on_progress(self, task, completed, total):
        self.events.append((self.name, "progress", task, completed, total))

    def on_strategy_end(self, result):
        self.events.append((self.name, "strategy_end", result.strategy))

    def on_run_end(self, results):
        self.events.append((self.name, "run_end", len(results)))


def test_callback_list_calls_callbacks_in_order(run_info, results):
    events = []
    callbacks = CallbackList([Recorder("first", events), Recorder("second", events)])

    callbacks.on_run_start(run_info)
    callbacks.on_progress("train", 1, 2)
    callbacks.on_round_end({"round": 1})
    callbacks.on_strategy_end(results[0])
    callbacks.on_run_end(results)

    assert events == [
        ("first", "run_start"),
        ("second", "run_start"),
        ("first", "progress", "train", 1, 2),
        ("second", "progress", "train", 1, 2),
        ("first", "round_end", 1),
        ("second", "round_end", 1),
        ("first", "strategy_end", "cloud_only"),
        ("second", "strategy_end", "cloud_only"),
        ("first", "run_end", 6),
        ("second", "run_end", 6),
    ]


def test_base_callback_hooks_do_nothing(run_info, results):
    callback = Callback()

    callback.on_run_start(run_info)
    callback.on_round_end({"round": 0})
    callback.on_progress("train", 0, 1)
    callback.on_strategy_end(results[0])
    callback.on_run_end(results)


def test_rich_progress_draws_one_bar_per_task(run_info, results):
    buffer = io.StringIO()
    progress = RichProgress(console=Console(file=buffer, width=120))
    callbacks = CallbackList([progress])

    callbacks.on_run_start(run_info)
    for result in results[:2]:
        task = f"{result.strategy} seed {result.seed}"
        for completed in range(4):
            callbacks.on_progress(task, completed, 3)
        callbacks.on_strategy_end(result)
    callbacks.on_run_end(results[:2])

    output = buffer.getvalue()
    assert output.count("cloud_only seed 0") == 1
    assert output.count("cloud_only seed 1") == 1
    assert "100%" in output


def test_rich_progress_starts_fresh_bars_after_a_run_ends():
    buffer = io.StringIO()
    progress = RichProgress(console=Console(file=buffer, width=120))

    progress.on_progress("first run", 1, 1)
    progress.on_run_end([])
    progress.on_progress("second run", 1, 2)
    progress.close()
    progress.close()

    output = buffer.getvalue()
    assert "first run" in output
    assert "second run" in output
    assert "50%" in output
