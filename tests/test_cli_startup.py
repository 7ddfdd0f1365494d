"""`--help`, `--version` and argument errors never import torch (they must start fast),
and every parser shows its defaults and the llama.cpp-style short flags."""

import subprocess
import sys

import pytest

from offload_engine.cli.main import COMMAND_MODULES

COMMANDS = [name.removesuffix("_cmd") for name in COMMAND_MODULES]
HEAVY = ("torch", "transformers", "numpy", "safetensors")
PROBE = f"""
import sys
from offload_engine.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
print('HEAVY', heavy, file=sys.stderr)
"""


def _probe(*argv):
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True,
                            text=True, timeout=60)
    heavy = [line for line in result.stderr.splitlines() if line.startswith("HEAVY")]
    return result, heavy[-1] if heavy else result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run"], ["bogus"]]
                         + [[command, "--help"] for command in COMMANDS],
                         ids=lambda argv: " ".join(argv))
def test_help_version_and_argument_errors_import_no_torch(argv):
    result, heavy = _probe(*argv)
    assert heavy == "HEAVY []", (argv, heavy)


def test_defaults_and_short_flags_in_help(capsys):
    from offload_engine.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for piece in ("-p PROMPT, --prompt PROMPT", "-n N, --max-new-tokens N",
                  "-c N, --ctx-size N", "(default: 128)", "--temp T, --temperature T",
                  "--top-k K", "--min-p P", "--repeat-penalty R", "PROMPT",
                  "visible (default: auto)"):
        assert piece in text, piece
    assert "(default 2) (default" not in text  # a default the text states is not repeated


def test_run_takes_a_positional_prompt_and_short_flags(qwen2_q, capsys):
    from offload_engine.cli import main

    common = ["--greedy", "--device", "cpu", "--no-progress", "--cache-entries", "3"]
    assert main(["run", str(qwen2_q), "the", "-n", "5", *common]) == 0
    positional = capsys.readouterr()
    assert main(["run", str(qwen2_q), "-p", "the", "--max-new-tokens", "5", *common]) == 0
    flagged = capsys.readouterr()
    assert positional.out == flagged.out and "[5 tokens" in positional.err


def test_ctx_size_caps_the_context_in_one_line(qwen2_q, capsys):
    from offload_engine.cli import main

    code = main(["run", str(qwen2_q), "the the the the the the", "-n", "8", "-c", "10",
                 "--device", "cpu", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--ctx-size 10" in err and "Traceback" not in err
