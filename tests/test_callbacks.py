import io

from bench.engine.callbacks import Callback, ConsoleProgress

METRICS = {"train_loss": 2.5, "test_acc": 0.25, "epoch_time_s": 1.5}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_base_callback_hooks_do_nothing_and_never_ask_to_stop():
    cb = Callback()
    cb.on_fit_start(start_epoch=0, epochs=2)
    assert cb.on_epoch_end(1, METRICS) is None


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = ConsoleProgress("cell", stream=out)
    progress.on_fit_start(start_epoch=0, epochs=2)
    progress.on_epoch_end(1, METRICS)
    progress.on_fit_end(None)
    lines = out.getvalue().splitlines()
    assert lines == ["cell: epoch 1/2 loss 2.500 test_acc 0.250 (1.5 s)"]


def test_plain_lines_say_when_a_run_resumes():
    out = io.StringIO()
    ConsoleProgress("cell", stream=out).on_fit_start(start_epoch=4, epochs=10)
    assert "resuming after epoch 4/10" in out.getvalue()


def test_progress_bar_on_a_terminal():
    out = Tty()
    progress = ConsoleProgress("cell", stream=out)
    progress.on_fit_start(start_epoch=0, epochs=2)
    progress.on_epoch_end(1, METRICS)
    assert progress.bar is not None and progress.bar.n == 1
    progress.on_fit_end(None)
    text = out.getvalue()
    assert "cell" in text and "loss 2.500 test_acc 0.250" in text
