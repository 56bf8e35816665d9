"""cloudops.output.table (rich): the same columns in a pipe as before, bold titles on a terminal only."""

from cloudops import output

ROWS = [{"name": "a", "host": "hv1", "ip": None, "up": True},
        {"name": "longer-name", "host": "hv2", "ip": "1.2.3.4", "up": False}]


def test_columns_are_the_widest_cell_two_spaces_apart_without_escapes():
    text = output.table(ROWS, ["name", "host", "ip", "up"], styled=False)
    assert text.splitlines() == ["NAME         HOST  IP       UP",
                                 "a            hv1   -        yes",
                                 "longer-name  hv2   1.2.3.4  no"]
    assert "\x1b" not in text


def test_titles_are_bold_on_a_terminal_and_cells_are_never_markup():
    text = output.table([{"name": "[bold]x[/bold]"}], ["name"], styled=True)
    assert text.splitlines() == ["\x1b[1mNAME\x1b[0m", "[bold]x[/bold]"]


def test_a_long_cell_is_cut_and_nothing_wraps():
    text = output.table([{"path": "x" * 200, "n": 1.5}], ["path", "n"], max_width=10, styled=False)
    assert text.splitlines() == ["PATH        N", "xxxxxxxxx…  1.50"]
