"""``partita simulate``: the churn simulator (controller/simulate, docs/simulate.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from controller import cli
from controller.simulate.cluster import build_cluster, cluster_profile
from controller.simulate.engine import simulate
from controller.simulate.main import add_arguments, simulate_report
from controller.simulate.metrics import summarize
from controller.simulate.shapes import Shape, parse_shape
from controller.simulate.strategies import SIM_STRATEGIES
from controller.simulate.trace import load_trace
from controller.simulate.workload import Request

ONE_H100 = ["--node", "n1=H100-SXM5-80GB:1"]


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def _without_timings(report: dict) -> dict:
    out = json.loads(json.dumps(report))
    for s in out["strategies"]:
        s.pop("seconds")
    return out


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(["simulate", *argv])
    got = capsys.readouterr()
    return rc, got.out, got.err


# -- determinism --------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_report_and_another_seed_another() -> None:
    argv = ["--nodes", "2", "--ticks", "200", "--mix", "mixed", "--series"]
    first = _without_timings(simulate_report(_args(*argv, "--seed", "7"))[0])
    again = _without_timings(simulate_report(_args(*argv, "--seed", "7"))[0])
    other = _without_timings(simulate_report(_args(*argv, "--seed", "8"))[0])
    assert first == again
    assert first["workload"]["requests"] > 20
    assert first["series"] != other["series"]
    # every strategy saw the same arrivals
    arrived = {s["strategy"]: s["arrived"] for s in first["strategies"]}
    assert set(arrived) == set(SIM_STRATEGIES) and len(set(arrived.values())) == 1


# -- hand-checked waits ---------------------------------------------------------------------------------
TINY = """arrival,duration,request,comment
0,5,gpu:1,holds the only GPU until tick 5
1,3,gpu:1,waits 1 -> 5 and runs until 8
2,2,mig:1g.10gb,waits behind it (arrival order) until 8
8,1,mig:1g.10gb,fits beside it at once
"""


def test_waits_on_a_tiny_hand_checked_scenario(tmp_path: Path) -> None:
    trace = tmp_path / "tiny.csv"
    trace.write_text(TINY)
    cluster = build_cluster(cluster_profile(["n1=H100-SXM5-80GB:1"], None, None, None))
    requests = load_trace(trace)
    pack = simulate(SIM_STRATEGIES["pack"], cluster, requests, None)
    assert pack.starts == {0: 0, 1: 5, 2: 8, 3: 8}
    assert pack.ticks == 10            # r2 ends at 10: the drained run stops there
    s = summarize(pack, requests, warmup=0)
    gpu, mig = s["by_shape"]["gpu:1"], s["by_shape"]["mig:1g.10gb"]
    assert (gpu["mean_wait"], gpu["p95_wait"], gpu["mean_run"], gpu["wait_per_run"]) == (2.0, 4.0, 4.0, 0.5)
    assert (mig["mean_wait"], mig["p95_wait"], mig["mean_run"], mig["wait_per_run"]) == (3.0, 6.0, 1.5, 2.0)
    # useful capacity: a whole GPU for ticks 0-7, two 1g.10gb (2/8) at tick 8, one at tick 9
    assert pack.useful == pytest.approx([1.0] * 8 + [0.25, 0.125])
    assert s["useful_capacity"] == pytest.approx((8 + 0.25 + 0.125) / 10)
    # the device-plugin world: the first 1g.10gb takes the whole GPU, so the second waits for it
    whole = simulate(SIM_STRATEGIES["whole-gpu-only"], cluster, requests, None)
    assert whole.starts == {0: 0, 1: 5, 2: 8, 3: 10}
    assert whole.useful == pytest.approx([1.0] * 8 + [0.125, 0.125, 0.125])
    assert whole.held[8:] == pytest.approx([1.0, 1.0, 1.0])
    w = summarize(whole, requests, warmup=0)["by_shape"]["mig:1g.10gb"]
    assert (w["mean_wait"], w["p95_wait"]) == (4.0, 6.0)


def test_fragmentation_counts_free_capacity_on_partly_used_gpus_and_nodes() -> None:
    cluster = build_cluster(cluster_profile(["a=H100-SXM5-80GB:2", "b=H100-SXM5-80GB:2"], None, None, None))
    requests = [Request(0, 0, 10, Shape("mig", profile="3g.40gb"))]     # half of one GPU of node a
    run = simulate(SIM_STRATEGIES["first-fit"], cluster, requests, 1)
    # free: 0.5 + 1 + 1 + 1 = 3.5 GPUs, of which 0.5 on the partly used GPU
    assert run.gpu_frag == pytest.approx([0.5 / 3.5])
    # idle GPUs: a's second and both of b; one of the three is on a node in use
    assert run.node_frag == pytest.approx([1 / 3])
    assert run.useful == pytest.approx([0.5 / 4]) and run.held == pytest.approx([0.5 / 4])


def test_a_shape_that_fits_no_empty_node_is_unplaceable_not_waiting() -> None:
    cluster = build_cluster(cluster_profile(["a=H100-SXM5-80GB:4"], None, None, None))
    requests = [Request(0, 0, 3, Shape("gpu", count=8)), Request(1, 0, 3, Shape("gpu", count=2))]
    run = simulate(SIM_STRATEGIES["pack"], cluster, requests, 5)
    assert run.unplaceable == {0} and run.starts == {1: 0}
    s = summarize(run, requests, 0)
    assert s["unplaceable"] == 1 and s["never_placed"] == 0


# -- strategies ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mix", ["mig", "shared"])
def test_whole_gpu_only_puts_less_capacity_to_use_than_pack(mix: str) -> None:
    report, _ = simulate_report(_args("--nodes", "2", "--ticks", "300", "--mix", mix,
                                      "--strategies", "pack", "whole-gpu-only"))
    by = {s["strategy"]: s for s in report["strategies"]}
    pack, whole = by["pack"], by["whole-gpu-only"]
    # at 125 % load, rounding every MIG device or share up to a whole GPU holds the cluster full
    # while much less of it is asked for
    assert whole["held_capacity"] > 0.9
    assert whole["useful_capacity"] < pack["useful_capacity"] - 0.2
    assert whole["never_placed"] > pack["never_placed"]


def test_reusing_the_allocator_across_ticks_matches_allocating_over_every_node() -> None:
    """The loop offers the allocator only nodes not known to be full for the shape; the placements must
    be those of asking over every node each time (a fresh state rebuilt from the running claims)."""
    from controller.allocator import AllocatedState
    from controller.simulate.shapes import claim_for

    cluster = build_cluster(cluster_profile(["a=H100-SXM5-80GB:2", "b=H100-SXM5-80GB:2"], None, None, None))
    from controller.simulate.workload import generate

    requests = generate("mixed", cluster, ticks=120, load=1.25, mean_duration=10, seed=3)
    for name in ("first-fit", "pack"):
        strategy = SIM_STRATEGIES[name]
        run = simulate(strategy, cluster, requests, 120)
        # replay naively: every tick, every pending request over every node, state rebuilt from scratch
        allocator = strategy.new_allocator()
        running: list[tuple[int, dict]] = []
        pending: list[Request] = []
        starts: dict[int, int] = {}
        for tick in range(120):
            running = [(end, a) for end, a in running if end > tick]
            pending += [r for r in requests if r.arrival == tick]
            for r in list(pending):
                state = AllocatedState()
                for _, a in running:
                    state.add_allocation(a)
                choice = allocator.allocate_on_nodes(cluster.nodes, [claim_for(r.shape, "x")], cluster.slices,
                                                     cluster.classes, state)
                if choice.node is not None:
                    running.append((tick + r.duration, choice.results[0]))
                    starts[r.id] = tick
                    pending.remove(r)
        placed = {i: t for i, t in run.starts.items()}
        assert placed == starts, name


# -- trace files --------------------------------------------------------------------------------------
def test_trace_files_in_csv_and_json_give_the_same_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_file = tmp_path / "pods.csv"
    csv_file.write_text(TINY)
    json_file = tmp_path / "pods.json"
    json_file.write_text(json.dumps([{"arrival": 0, "duration": 5, "request": "gpu:1"},
                                     {"arrival": 1, "duration": 3, "request": "gpu:1"},
                                     {"arrival": 2.5, "duration": 1.2, "request": "mig:1g.10gb"},
                                     {"arrival": 8, "duration": 1, "request": "mig:1g.10gb",
                                      "model": "H100-SXM5-80GB"}], indent=1))
    rc, out, err = _run_cli([*ONE_H100, "--trace", str(csv_file), "-o", "json"], capsys)
    assert rc == 0, err
    from_csv = json.loads(out)
    rc, out, err = _run_cli([*ONE_H100, "--trace", str(json_file), "-o", "json"], capsys)
    assert rc == 0, err
    from_json = json.loads(out)
    assert from_csv["workload"]["requests"] == from_json["workload"]["requests"] == 4
    # asked for: 5 + 3 GPU-ticks of whole GPUs, 2 + 1 ticks of 1/8 GPU, over ticks 0-8 of one GPU
    assert from_csv["workload"]["offered_load"] == pytest.approx((5 + 3 + 3 / 8) / 9)
    pack_csv = next(s for s in from_csv["strategies"] if s["strategy"] == "pack")
    pack_json = next(s for s in from_json["strategies"] if s["strategy"] == "pack")
    assert pack_csv["by_shape"]["gpu:1"] == pack_json["by_shape"]["gpu:1"]
    # 2.5 -> tick 2, 1.2 -> 2 ticks: the same MIG waits; the model-limited one is its own shape
    assert pack_json["by_shape"]["mig:1g.10gb"]["mean_wait"] == 6.0
    assert pack_json["by_shape"]["mig:1g.10gb@H100-SXM5-80GB"]["mean_wait"] == 0.0
    rc, out, _ = _run_cli([*ONE_H100, "--trace", str(csv_file)], capsys)
    assert rc == 0 and "until every request ended (10-11 ticks by strategy)" in out and "mig:1g.10gb" in out


@pytest.mark.parametrize("name, text, expected", [
    ("no-duration.csv", "arrival,request\n0,gpu:1\n", ["no-duration.csv line 1", "missing column 'duration'"]),
    ("bad-model.csv", "arrival,duration,request,model\n0,1,gpu:1,H100-SXM5-80GB\n3,2,gpu:2,H900-SXM\n",
     ["bad-model.csv line 3", "field 'model'", "unknown GPU model 'H900-SXM'"]),
    ("bad-model-in-request.csv", "arrival,duration,request\n0,1,gpu:1@B300\n",
     ["bad-model-in-request.csv line 2", "field 'request'", "unknown GPU model 'B300'"]),
    ("bad-duration.csv", "arrival,duration,request\n0,1,gpu:1\n\n4,soon,gpu:1\n",
     ["bad-duration.csv line 4", "field 'duration'", "'soon'"]),
    ("bad-shape.json", '[\n {"arrival": 0, "duration": 1, "request": "gpu:1"},\n {"arrival": 1, "duration": 1,'
     ' "request": "tpu:1"}\n]', ["bad-shape.json line 3", "field 'request'", "gpu:N, mig:PROFILE or shared:MEMORY"]),
    ("missing.json", '[{"arrival": 0, "request": "gpu:1"}]', ["missing.json line 1", "field 'duration'"]),
    ("unknown-profile.csv", "arrival,duration,request\n0,1,mig:9g.99gb\n",
     ["unknown-profile.csv line 2", "field 'request'", "MIG profile '9g.99gb'", "3g.40gb"]),
    ("model-not-in-cluster.csv", "arrival,duration,request\n0,1,gpu:1@L4\n",
     ["model-not-in-cluster.csv line 2", "GPU model 'L4' is not in the cluster"]),
])
def test_bad_trace_names_file_line_and_field_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          name: str, text: str, expected: list[str]) -> None:
    path = tmp_path / name
    path.write_text(text)
    rc, out, err = _run_cli([*ONE_H100, "--trace", str(path)], capsys)
    assert rc == 2 and out == ""
    assert str(path) in err
    for part in expected:
        assert part in err


@pytest.mark.parametrize("argv, expected", [
    (["--node", "n1=H900:8"], ["--node 'n1=H900:8'", "unknown GPU model 'H900'", "H100-SXM5-80GB"]),
    (["--nodes", "2", "--gpus", "L4:2", "--mix", "mig"], ["--mix mig", "no GPU of the cluster offers MIG"]),
    (["--node", "n1=L4:1", "--nodes", "3"], ["only one of --node, --profile and --nodes/--gpus"]),
    (["--strategies", "best-fit"], ["unknown strategy 'best-fit'"]),
    (["--trace", "/nonexistent/pods.csv"], ["/nonexistent/pods.csv does not exist"]),
])
def test_bad_options_exit_2_with_the_fix(capsys: pytest.CaptureFixture[str], argv: list[str],
                                         expected: list[str]) -> None:
    rc, out, err = _run_cli(argv, capsys)
    assert rc == 2 and out == ""
    for part in expected:
        assert part in err


def test_shapes_parse_and_print_the_same() -> None:
    for text in ("gpu:4", "mig:3g.40gb", "shared:20Gi", "shared:1536Mi", "gpu:2@H100-SXM5-80GB"):
        assert str(parse_shape(text)) == text
    assert parse_shape("shared:20Gi").memory == 20 * 1024**3
    with pytest.raises(ValueError, match="1 to 64"):
        parse_shape("gpu:0")


# -- output -------------------------------------------------------------------------------------------
def test_table_output_lists_every_strategy_and_shape(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run_cli(["--nodes", "2", "--ticks", "300", "--mix", "whole", "--seed", "2"], capsys)
    assert rc == 0, err
    for word in ("first-fit", "pack", "whole-gpu-only", "useful", "GPU frag", "node frag", "gpu:1", "gpu:8"):
        assert word in out


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "sim.png"
    rc, out, err = _run_cli(["--nodes", "2", "--ticks", "200", "--mix", "mixed", "--plot", str(png)], capsys)
    assert rc == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"plot written to {png}" in out


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *a, **k):  # noqa: ANN002, ANN003, ANN202
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    png = tmp_path / "sim.png"
    rc, out, err = _run_cli([*ONE_H100, "--ticks", "5", "--mix", "whole", "--plot", str(png)], capsys)
    assert rc == 2 and "pip install 'partita[plot]'" in err and not png.exists()


def test_a_shape_none_of_whose_steady_state_arrivals_was_placed_has_no_wait_figure() -> None:
    cluster = build_cluster(cluster_profile(["n1=H100-SXM5-80GB:1"], None, None, None))
    requests = [Request(0, 0, 50, Shape("gpu", count=1)), Request(1, 5, 1, Shape("gpu", count=1))]
    run = simulate(SIM_STRATEGIES["pack"], cluster, requests, 20)
    row = summarize(run, requests, warmup=0)["by_shape"]["gpu:1"]
    assert row["never_placed"] == 1 and row["steady_state_placed"] == 1 and row["mean_wait"] == 0.0
    row = summarize(run, requests, warmup=3)["by_shape"]["gpu:1"]     # only request 1 arrived in steady state
    assert row["steady_state_placed"] == 0 and row["mean_wait"] is None and row["wait_per_run"] is None


def test_reports_are_the_same_across_processes_whatever_the_hash_seed() -> None:
    """Share IDs are random UUIDs and string hashes differ per process; neither may change a placement."""
    import os
    import subprocess
    import sys

    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        r = subprocess.run([sys.executable, "-m", "controller", "simulate", "--nodes", "2", "--ticks", "150",
                            "--mix", "mixed", "--seed", "4", "-o", "json", "--series"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(_without_timings(json.loads(r.stdout)))
    assert outs[0] == outs[1]


def test_a_trace_cut_short_by_ticks_counts_only_what_arrived(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "tiny.csv"
    trace.write_text(TINY)
    rc, out, err = _run_cli([*ONE_H100, "--trace", str(trace), "--ticks", "5", "-o", "json"], capsys)
    assert rc == 0, err
    pack = next(s for s in json.loads(out)["strategies"] if s["strategy"] == "pack")
    # requests 0-2 arrived by tick 4; request 1 and 2 are still waiting when the run stops
    assert pack["arrived"] == 3 and pack["placed"] == 1 and pack["never_placed"] == 2


# -- the queue-aware strategy -----------------------------------------------------------------------------
STARVING = """arrival,duration,request,comment
0,30,gpu:1,A holds GPU 0 until 30
0,40,gpu:1,B holds GPU 1 until 40
1,10,gpu:2,BIG waits for both
20,50,gpu:1,C would take GPU 0 at 30 and hold it until 80
25,5,gpu:1,D ends before BIG could start: backfilled
"""


def test_queue_reserves_for_a_long_waiting_large_request_and_backfills_only_what_ends_before(tmp_path: Path) -> None:
    trace = tmp_path / "starving.csv"
    trace.write_text(STARVING)
    cluster = build_cluster(cluster_profile(["n1=H100-SXM5-80GB:2"], None, None, None))
    requests = load_trace(trace)
    # pack (arrival order): C and D backfill the GPUs as they free, BIG waits until C ends at 80
    assert simulate(SIM_STRATEGIES["pack"], cluster, requests, None).starts == {0: 0, 1: 0, 2: 80, 3: 30, 4: 40}
    # queue: BIG has waited 25 ticks at 26, both GPUs are reserved for it (free at 40); D (30 + 5 <= 40) may
    # use GPU 0 meanwhile, C (30 + 50 > 40) may not; BIG starts at 40, C after it
    assert simulate(SIM_STRATEGIES["queue"], cluster, requests, None).starts == {0: 0, 1: 0, 2: 40, 3: 50, 4: 30}


def test_a_shape_never_served_has_a_wait_growing_a_tick_per_tick_and_is_unbounded() -> None:
    cluster = build_cluster(cluster_profile(["n1=H100-SXM5-80GB:1"], None, None, None))
    requests = [Request(0, 0, 50, Shape("gpu", count=1)), Request(1, 0, 1, Shape("mig", profile="1g.10gb"))]
    run = simulate(SIM_STRATEGIES["pack"], cluster, requests, 20)
    rows = summarize(run, requests, warmup=0)["by_shape"]
    mig = rows["mig:1g.10gb"]["bound"]
    # the MIG request waits the whole run: its age is 0..19, 4.5 on average in the first half, 14.5 in the second
    assert (mig["oldest_first_half"], mig["oldest_second_half"], mig["oldest_at_end"]) == (4.5, 14.5, 19)
    assert mig["growth"] == 1.0 and mig["bounded"] is False
    gpu = rows["gpu:1"]["bound"]          # placed at once: nothing of it ever waits
    assert gpu["growth"] == 0.0 and gpu["bounded"] is True
