"""The progress display: plain lines in a log, a bar with total and step name on a terminal."""

import io

from convlens.progress import ProgressDisplay, Step, Steps


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_steps_number_sections_and_sub_steps_against_announced_totals():
    seen = []
    steps = Steps(3, seen.append)
    steps.begin("model")
    steps.begin("heatmaps")
    steps.expect(2)
    steps.advance("gradcam")
    steps.advance("saliency")
    steps.begin("evaluation")
    assert [str(s) for s in seen] == ["[1/3] model", "[2/3] heatmaps", "[2/3] heatmaps: gradcam (1/2)",
                                      "[2/3] heatmaps: saliency (2/2)", "[3/3] evaluation"]
    Steps().begin("nobody listens")  # no callback: counting only, nothing raised


def test_a_log_gets_one_flushed_line_per_step_and_no_carriage_return():
    log = io.StringIO()
    with ProgressDisplay("explain", total=3, stream=log) as shown:
        for name in ("gradcam", "saliency", "scorecam"):
            shown.begin(name)
    with ProgressDisplay("report", stream=log) as shown:
        shown.step(Step(2, 9, "heatmaps", 1, 4, "gradcam"))
    assert log.getvalue() == ("[1/3] explain: gradcam\n[2/3] explain: saliency\n[3/3] explain: scorecam\n"
                              "[2/9] heatmaps: gradcam (1/4)\n")


def test_counted_work_in_a_log_is_a_line_per_count_or_per_share_of_the_total():
    log = io.StringIO()
    with ProgressDisplay("evaluate", stream=log) as shown:
        for done in (3, 3, 4):  # a resumed run starts at 3; a repeated count prints nothing
            shown(done, 4)
    assert log.getvalue() == "[3/4] evaluate\n[4/4] evaluate\n"
    log = io.StringIO()
    with ProgressDisplay("scan", unit="img", lines=4, stream=log) as shown:
        for done in range(1, 11):
            shown(done, 10)
        for done in range(1, 3):  # counting starts again (the next folder): its own lines
            shown(done, 2)
    assert log.getvalue().splitlines() == ["[3/10] scan", "[5/10] scan", "[8/10] scan", "[10/10] scan",
                                           "[1/2] scan", "[2/2] scan"]


def test_a_terminal_gets_a_bar_with_the_total_and_the_step_name():
    screen = Terminal()
    with ProgressDisplay("report", unit="section", stream=screen) as shown:
        steps = Steps(9, shown.step)
        steps.begin("model")
        steps.begin("predictions")
        steps.begin("heatmaps")
        steps.expect(4)
        steps.advance("gradcam")
        shown.note("a name for the bar only")
        drawn = screen.getvalue()
    assert "\r" in drawn and "\n" not in drawn  # redrawn in place
    last = drawn.rsplit("\r", 1)[-1]
    assert "2/9" in last and "a name for the bar only" in last
    assert "heatmaps: gradcam (1/4)" in drawn
    log = io.StringIO()
    ProgressDisplay(stream=log).note("ignored in a log")
    assert log.getvalue() == ""


def test_skipped_sub_steps_are_counted_so_the_last_one_still_matches_the_total():
    seen = []
    steps = Steps(1, seen.append)
    steps.begin("evaluation")
    steps.expect(4)
    steps.skip(2)  # a method that does not apply: its two images never run
    steps.advance("saliency on a")
    steps.advance("saliency on b")
    assert [str(s) for s in seen[1:]] == ["[1/1] evaluation: saliency on a (3/4)",
                                          "[1/1] evaluation: saliency on b (4/4)"]
