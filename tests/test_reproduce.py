"""noisekernels reproduce: every experiment runs in a tiny smoke mode (on mnist-5k for the MNIST
papers) and writes its record, tables and plots; the report gathers the records; the full default
mode is a slow test."""

import json
import os

import pytest
import torch

from noisekernels import reproduce

NAMES = list(reproduce.REGISTRY)
MNIST_PAPERS = {"random-spiking.txt", "efficient-defenses-brelu-gda.txt"}
KEYS = {"name", "paper", "scale", "dataset", "seconds", "paper_setting", "paper_numbers", "settings", "choices",
        "deviations", "tables", "checks", "plots", "models_trained"}


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reproduce"))


@pytest.fixture(autouse=True)
def one_thread(threads):
    threads(1)


def test_registry_covers_every_paper():
    papers = {e.paper for e in reproduce.REGISTRY.values()}
    assert papers == {"random-spiking.txt", "random-self-ensemble.txt", "a2snn-anisotropic-noise.txt",
                      "random-perturbations-analysis.txt", "efficient-defenses-brelu-gda.txt"}
    for e in reproduce.REGISTRY.values():
        assert set(e.settings) == set(reproduce.SCALES)
        assert e.settings["quick"]["dataset"] == "digits"
        # The MNIST papers run on real MNIST digits by default; the others say which dataset stands in.
        default = e.settings["default"]["dataset"]
        assert default == ("mnist-5k" if e.paper in MNIST_PAPERS else "digits")
        for scale in ("smoke", "quick", "default"):
            dataset = e.settings[scale]["dataset"]
            assert any(dataset in d for d in e.deviations(e.settings[scale], dataset)), (e.name, scale)


def test_mnist_papers_default_to_the_papers_architecture():
    for e in reproduce.REGISTRY.values():
        if e.paper in MNIST_PAPERS:
            s = e.settings["default"]
            assert s["model_options"] == {} and s["model"] == e.settings["full"]["model"], e.name
            assert not any("shrunk" in d for d in e.deviations(s, "mnist-5k"))


@pytest.mark.parametrize("name", NAMES)
def test_smoke_run_writes_record_tables_and_plots(name, smoke_out):
    record = reproduce.run(name, scale="smoke", out=smoke_out, log=lambda *a: None)
    assert KEYS <= set(record) and record["scale"] == "smoke"
    assert record["dataset"] == ("mnist-5k" if record["paper"] in MNIST_PAPERS else "digits")
    (directory,) = [os.path.join(smoke_out, name, d) for d in os.listdir(os.path.join(smoke_out, name))]
    with open(os.path.join(directory, "record.json")) as f:
        assert json.load(f) == record
    assert os.path.getsize(os.path.join(directory, "tables.md")) > 0
    for plot in record["plots"]:
        with open(os.path.join(directory, plot), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert record["tables"] and all(len(row) == len(t["columns"]) for t in record["tables"] for row in t["rows"])
    assert record["checks"] and all(c["held"] in (True, False, None) for c in record["checks"])


def test_report_gathers_the_latest_records(smoke_out, tmp_path):
    for name in NAMES:
        if not os.path.isdir(os.path.join(smoke_out, name)):
            reproduce.run(name, scale="smoke", out=smoke_out, log=lambda *a: None)
    to = str(tmp_path / "REPRODUCTION.md")
    assert reproduce.report(smoke_out, to, scales=("smoke",)) == NAMES
    text = open(to).read()
    for e in reproduce.REGISTRY.values():
        assert f"## {e.title}" in text and e.paper_numbers.splitlines()[0] in text
    assert text.count("**Deviations.**") == len(NAMES) and "Did the paper's direction hold?" in text
    with pytest.raises(SystemExit, match="no run records of scale full or default"):  # none of that scale there
        reproduce.report(smoke_out, str(tmp_path / "none.md"))
    assert not (tmp_path / "none.md").exists()  # an empty report never replaces one


def test_command_line(capsys, tmp_path):
    assert reproduce.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in NAMES)
    with pytest.raises(ValueError, match="experiment must be one of"):
        reproduce.main(["no-such-experiment", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="pass its directory with --data DIR"):
        reproduce.main(["efficient-defenses", "--full", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        reproduce.main(["--threads", "0", "efficient-defenses"])
    with pytest.raises(SystemExit, match="--quick and --smoke exclude each other"):
        reproduce.main(["--quick", "--smoke", "efficient-defenses"])
    torch.set_num_threads(1)


def test_noisekernels_reproduce_subcommand(capsys, tmp_path):
    from noisekernels import cli
    cli.main(["reproduce", "--list"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in NAMES)
    cli.main(["reproduce", "random-perturbations", "--smoke", "--out", str(tmp_path)])
    assert len(os.listdir(tmp_path / "random-perturbations")) == 1
    torch.set_num_threads(1)


@pytest.mark.slow
def test_default_mode_of_every_experiment(tmp_path):
    records = [reproduce.run(name, out=str(tmp_path)) for name in NAMES]
    assert all(r["scale"] == "default" and r["tables"] and r["checks"] for r in records)
    assert sum(r["seconds"] for r in records) < 45 * 60
