"""What `python -m server.simulation` tells the user when `flwr run` fails."""

from __future__ import annotations

from server.simulation import failure_cause

# the tail of `flwr run`'s output (flwr 1.42) when its managed SuperLink does not start in time
_BOX = """Starting local SuperLink on 127.0.0.1:56181...
╭─ Error ──────────────────────────────────────────────────────────────────────╮
│ Failed to start local SuperLink within 15s. See logs at                      │
│ /tmp/fedmef-flwr-home-sfdexej7/local-superlink/superlink.log.                │
╰──────────────────────────────────────────────────────────────────────────────╯
"""


def test_a_superlink_that_missed_flwrs_start_up_limit_is_named_with_what_to_do(tmp_path):
    log = tmp_path / "flwr.log"
    log.write_text(_BOX)
    cause = failure_cause(log)
    assert "Failed to start local SuperLink within 15s." in cause and "run again when it is quieter" in cause


def test_the_server_apps_error_lines_are_the_cause_and_nothing_else_is(tmp_path):
    log = tmp_path / "flwr.log"
    log.write_text("INFO :      round 1\n\x1b[91mERROR \x1b[0m:     the run failed: no data\nDEBUG : x\n")
    assert failure_cause(log) == "\n  the run failed: no data"
    log.write_text("INFO :      round 1\n")
    assert failure_cause(log) == ""
