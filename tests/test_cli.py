"""The command line's boundary: arguments checked by argparse, options by their dataclasses,
each refusal one line naming its command; one default window per switch kind."""

from __future__ import annotations

import pytest

from switchreduce.cli import main
from switchreduce.emulation.topo import DEFAULT_SLOTS, TopoOptions
from switchreduce.experiments.bench import BenchOptions
from switchreduce.experiments.config import SwitchConfig

pytestmark = pytest.mark.fast

CONTROLLER = ["controller", "--p4runtime", "127.0.0.1:1", "--data-plane", "127.0.0.1:2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [*CONTROLLER, "--host", "10.0.0.1=02:00:00:00:00:01"],
            "switchreduce controller: error: argument --host: bad KEY=VALUE "
            "'10.0.0.1=02:00:00:00:00:01': ",
        ),
        (
            [*CONTROLLER, "--route", "02:00:00:00:00:01"],
            "switchreduce controller: error: argument --route: bad KEY=VALUE "
            "'02:00:00:00:00:01': missing '='",
        ),
        (
            ["switch", "--raw", "one=s1-eth1"],
            "switchreduce switch: error: argument --raw: bad KEY=VALUE 'one=s1-eth1': ",
        ),
        (
            ["switch", "--world-size", "1", "--worker", "0=nowhere"],
            "switchreduce switch: error: argument --worker: worker must be RANK=IP:PORT",
        ),
    ],
)
def test_bad_key_value_options_are_refused_by_argparse_naming_the_command(
    argv, message, capsys
) -> None:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["worker", "--rank", "0", "--world-size", "2", "--backend", "gloo"],
            "switchreduce worker: --master HOST:PORT is required with gloo",
        ),
        (["switch"], "switchreduce switch: give a static job (--world-size, --worker)"),
        (
            ["switch", "--world-size", "2", "--worker", "0=127.0.0.1:1"],
            "switchreduce switch: job 1 needs ranks 0..1 once each, got [0]",
        ),
        ([*CONTROLLER, "--lease", "0"], "switchreduce controller: --lease must be positive"),
        (["topo", "--workers", "0"], "switchreduce topo: workers must be 1..32, got 0"),
    ],
)
def test_options_their_dataclasses_refuse_end_the_command_in_one_line(argv, message) -> None:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert str(refused.value.code).startswith(message)


def test_the_default_window_is_the_switch_kinds_wherever_a_switch_is_started() -> None:
    assert DEFAULT_SLOTS == {"soft": 64, "bmv2": 8}
    for kind, slots in DEFAULT_SLOTS.items():
        assert TopoOptions(switch=kind).slot_count == slots
        assert SwitchConfig(backend=kind).slot_count == slots
        assert BenchOptions(topo="mininet", switch=kind).topology().slot_count == slots
    assert TopoOptions(switch="bmv2", slots=4).slot_count == 4
