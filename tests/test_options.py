"""Every numeric option of every command refuses 0, -1, nan, inf, 1e38 and 2^64 where they are
out of its range: exit 2, one line naming the option, before any data is read."""
import argparse
import math

import pytest

from nvfp4bench import options
from nvfp4bench.checks import bench, gpu_check, verify_te
from nvfp4bench.data import prep
from nvfp4bench.grid import cli as grid
from nvfp4bench.train import cli as cell

BAD = ("0", "-1", "nan", "inf", "1e38", str(2**64))

# command -> option -> the values of BAD that are in range (every other one must be refused)
ACCEPTED = {
    "cell": {"--image-size": (), "--head-prior": (), "--fold": ("0",), "--seed": ("0",),
             "--epochs": (), "--batch-size": (), "--lr": (), "--weight-decay": ("0",),
             "--grad-clip": (), "--lr-factor": (), "--lr-patience": ("0",), "--patience": (),
             "--min-delta": ("0",), "--min-epochs": ("0",), "--workers": ("0",),
             "--threads": ("0",)},
    "data_prep": {"--image-size": (), "--min-brain": ("0",), "--slice-stride": (),
                  "--free-ratio": ("0",), "--patients": (), "--seed": ("0",), "--voxel-mm": (),
                  "--workers": (), "--limit": ()},
    "grid": {"--jobs": (), "--stale-after": (), "--gpus-per-task": (), "--max-running": (),
             "--task-index": ("0",), "--seeds": ("0",), "--folds": ("0",)},
    "bench quant": {"--size": (), "--repeats": (), "--threads": ()},
    "bench train": {"--image-size": (), "--batch-size": (), "--steps": (), "--warmup": ("0",),
                    "--epoch-slices": (), "--threads": ()},
    "verify_te": {"--seed": ("0",), "--sr-draws": ()},
    "gpu_check": {"--budget-s": ()},
}
CELL = ["--arch", "swin", "--scale", "tiny", "--recipe", "nvfp4_full", "--fold", "0",
        "--data", "/nonexistent/store"]
# command -> (main, the argv every call starts with: no data is there to read)
COMMANDS = {
    "cell": (cell.main, CELL),
    "data_prep": (prep.main, ["--source", "brats", "--input", "/nonexistent/raw", "--output",
                              "/nonexistent/store"]),
    "grid": (grid.main, ["--dry-run", "--data", "/nonexistent/store", "--out", "/nonexistent"]),
    "bench quant": (bench.main, ["quant"]),
    "bench train": (bench.main, ["train"]),
    "verify_te": (verify_te.main, []),
    "gpu_check": (gpu_check.main, ["--out", "/nonexistent/gpu_check"]),
}
PARSERS = {"cell": cell.build_parser, "data_prep": prep.build_parser, "grid": grid.build_parser,
           "verify_te": verify_te.build_parser, "gpu_check": gpu_check.build_parser}


def _numeric_options(parser: argparse.ArgumentParser) -> dict[str, object]:
    """option -> its type, for every option that takes a number (by its type or default)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        number_default = (isinstance(action.default, (int, float))
                          and not isinstance(action.default, bool))
        kind = getattr(action.type, "__name__", "")
        if action.type in (int, float) or number_default or kind in ("integer", "real",
                                                                      "_image_size"):
            found[action.option_strings[0]] = action.type
    return found


def _bench_parsers():
    sub = next(a for a in bench.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    return {f"bench {name}": p for name, p in sub.choices.items()}


@pytest.mark.parametrize("command", sorted(ACCEPTED))
def test_the_table_names_every_numeric_option_and_none_is_a_bare_int_or_float(command):
    parser = (_bench_parsers()[command] if command.startswith("bench")
              else PARSERS[command]())
    found = _numeric_options(parser)
    found.pop("--fold", None) if command == "grid" else None  # grid: --folds (a list)
    listed = set(ACCEPTED[command]) - {"--seeds", "--folds"}
    assert set(found) == listed
    assert not [opt for opt, kind in found.items() if kind in (int, float)]


CASES = [(command, option, value) for command, table in sorted(ACCEPTED.items())
         for option, accepted in table.items() for value in BAD if value not in accepted]


@pytest.mark.parametrize("command, option, value", CASES)
def test_an_out_of_range_number_exits_2_naming_the_option(command, option, value, capsys):
    main, argv = COMMANDS[command]
    with pytest.raises(SystemExit) as e:
        main([*argv, f"{option}={value}"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"argument {option}:" in err and len(err.strip().splitlines()[-1]) < 200, err
    assert "Traceback" not in err and "nonexistent" not in err   # no data was looked at


@pytest.mark.parametrize("value, ok", [("1e4", True), ("10000.5", False), ("3.5e38", False),
                                       ("1e-45", True), ("-0.0", False), ("0x10", False)])
def test_real_ranges_and_float32(value, ok):
    parse = options.real(0, options.MAX_LR, low_open=True)
    if ok:
        assert math.isfinite(parse(value))
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(value)


def test_integer_bounds_are_inclusive():
    parse = options.integer(0, options.SEED_MAX)
    assert parse("0") == 0 and parse(str(2**32 - 1)) == 2**32 - 1
    with pytest.raises(argparse.ArgumentTypeError, match="from 0 to 4294967295"):
        parse(str(2**32))
