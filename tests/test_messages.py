"""The wording of first-run messages: one line that says what is wrong and how to fix it, and
progress on stderr while ``meanflow eval`` works, with stdout kept to one JSON line."""

import json
import pickle
import zipfile

import numpy as np
import pytest
from cli_helpers import run

from meanflow import MeanFlowError
from meanflow.data import load_vectors
from meanflow.errors import plural


def test_unknown_command_is_named_once_with_the_closest_command(capsys):
    code, out, err = run(capsys, "bogus")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("meanflow: error: argument COMMAND: invalid choice: 'bogus' (choose "
                          "from ")
    assert "did you mean" not in err
    code, _, err = run(capsys, "trian")
    assert code == 2 and "invalid choice: 'trian'" in err and "(did you mean train?)" in err
    assert "meanflow: error: meanflow" not in err


def test_subcommand_errors_name_the_subcommand_once(capsys, tmp_path):
    code, _, err = run(capsys, "features", "trian")
    assert code == 2
    assert err.startswith("meanflow: error: meanflow features: argument ACTION: invalid choice")
    assert "(did you mean train?)" in err
    code, _, err = run(capsys, "train", "--data", "rings", "--out", str(tmp_path / "r"),
                       "--steps", "many")
    assert code == 2 and err.startswith("meanflow: error: meanflow train: argument --steps: "
                                        "invalid int value: 'many'")
    code, _, err = run(capsys, "train", "--data", "rings", "--out", str(tmp_path / "r"),
                       "--stpes", "5")
    assert code == 2 and err.startswith("meanflow: error: unrecognized arguments: --stpes 5 "
                                        "(did you mean --steps?)")


def _non_numeric(tmp_path, case):
    path = tmp_path / ("x.npz" if case.endswith("npz") else "x.npy")
    if case in ("text", "text npz"):
        path.write_text("hello")
    elif case == "object":
        np.save(path, np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)
    elif case == "object npz":
        np.savez(path, x=np.array([{"a": 1}, 2], dtype=object))
    elif case == "pickle":
        path.write_bytes(pickle.dumps([[1.0, 2.0]]))
    elif case == "corrupt npz":
        np.savez(path, x=np.ones((10, 2)))
        path.write_bytes(path.read_bytes()[:30])
    elif case == "member npz":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not an array")
    return str(path)


NON_NUMERIC = {"text": "it holds text starting 'hello' (convert a text table with numpy.loadtxt "
                       "and numpy.save)",
               "text npz": "it holds text starting 'hello'",
               "object": "it holds Python objects (dtype object)",
               "object npz": "it holds Python objects (dtype object)",
               "pickle": "it does not start with the .npy header",
               "corrupt npz": "its zip archive is damaged (BadZipFile: ",
               "member npz": "its member 'notes.txt' is not a .npy array"}


@pytest.mark.parametrize("case", list(NON_NUMERIC))
def test_non_numeric_files_are_refused_without_pickle_advice(tmp_path, capsys, tiny_run, case):
    path = _non_numeric(tmp_path, case)
    expected = (f"meanflow: error: {path} is not a NumPy array file of numbers (.npy/.npz "
                f"written by numpy.save/savez); {NON_NUMERIC[case]}")
    for argv in (["train", "--data", path, "--out", str(tmp_path / "run"), "--quiet"],
                 ["eval", "--run", tiny_run, "--reference", path, "--num", "10", "--quiet"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith(expected), err
        assert err.strip().endswith("; pickled objects are never loaded")
        assert "allow_pickle" not in err
    assert not (tmp_path / "run").exists()


def test_image_reference_statistics_file_that_is_text(tmp_path):
    from meanflow.eval.references import reference_stats

    (tmp_path / "stats.npz").write_text("mu sigma")
    with pytest.raises(MeanFlowError, match="is not a NumPy array file of numbers.*holds text"):
        reference_stats(str(tmp_path / "stats.npz"))


def test_counts_use_the_singular_for_one(tmp_path):
    assert plural(1, "row") == "1 row" and plural(2, "row") == "2 rows"
    assert plural(0, "class", "classes") == "0 classes"
    x = np.ones((10, 2))
    x[3, 0] = np.nan
    np.save(tmp_path / "one.npy", x)
    with pytest.raises(MeanFlowError, match=r"one.npy: 1 row holds NaN or Inf \(first at row 3\)"):
        load_vectors(str(tmp_path / "one.npy"))
    x[5, 1] = np.inf
    np.save(tmp_path / "two.npy", x)
    with pytest.raises(MeanFlowError, match=r"two.npy: 2 rows hold NaN or Inf"):
        load_vectors(str(tmp_path / "two.npy"))


def test_idx_byte_counts_are_singular_for_one(tmp_path):
    from meanflow.data import load_idx

    (tmp_path / "one-idx3-ubyte").write_bytes(b"\x00")
    with pytest.raises(MeanFlowError, match="1 byte is too short for an IDX images header"):
        load_idx(str(tmp_path / "one-idx3-ubyte"))


def test_mixed_image_sizes_name_the_cli_flag(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (9, 7)).save(tmp_path / "imgs" / "b.png")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "imgs"), "--out",
                       str(tmp_path / "run"), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pass --image-size S (Python: size=S) to resize them all to S x S" in err


def test_eval_shows_progress_on_stderr_and_one_json_line_on_stdout(tiny_run, capsys):
    argv = ["eval", "--run", tiny_run, "--reference", "eight-gaussians", "--num", "300"]
    code, out, err = run(capsys, *argv)
    assert code == 0 and len(out.splitlines()) == 1
    assert "sampling" in err and "300/300" in err
    code, quiet_out, quiet_err = run(capsys, *argv, "--quiet")
    assert code == 0 and quiet_err == ""
    assert json.loads(quiet_out) == json.loads(out)


def _one_line(code, out, err):
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_an_image_reference_for_a_vector_run_names_both_kinds(tiny_run, capsys, tmp_path):
    for reference in ("fashion-mnist", "digits"):
        err = _one_line(*run(capsys, "eval", "--run", tiny_run, "--reference", reference,
                             "--num", "10", "--quiet"))
        assert err.startswith(f"meanflow: error: reference '{reference}' is images but the run "
                              "generates vectors (2 dimensions); ")
        assert "a .npy/.npz file of (N, 2) points" in err
    (tmp_path / "pictures").mkdir()
    err = _one_line(*run(capsys, "eval", "--run", tiny_run, "--reference",
                         str(tmp_path / "pictures"), "--num", "10", "--quiet"))
    assert "is a folder of images but the run generates vectors" in err


def test_a_run_directory_as_data_or_reference_is_named_as_one(tiny_run, capsys, tmp_path):
    out = tmp_path / "new"
    err = _one_line(*run(capsys, "train", "--data", tiny_run, "--out", str(out), "--quiet"))
    assert err == (f"meanflow: error: {tiny_run!r} is a run directory, not data (it was trained "
                   f"on 'eight-gaussians'); give the data to train on, e.g. --data "
                   f"eight-gaussians; to continue that run use --out {tiny_run} --resume")
    assert not out.exists()
    err = _one_line(*run(capsys, "eval", "--run", tiny_run, "--reference", tiny_run,
                         "--num", "10", "--quiet"))
    assert err == (f"meanflow: error: {tiny_run!r} is a run directory, not reference data (it "
                   "was trained on 'eight-gaussians'); give the data to compare the samples "
                   "with, e.g. 'eight-gaussians'")
    exported = str(tmp_path / "exported")
    assert run(capsys, "export", "--run", tiny_run, "--out", exported)[0] == 0
    err = _one_line(*run(capsys, "train", "--data", exported, "--out", str(out), "--quiet"))
    assert err.startswith(f"meanflow: error: {exported!r} is an exported model, not data (it "
                          "was trained on 'eight-gaussians')")


def test_set_with_a_space_instead_of_equals_shows_the_joined_form(capsys, tmp_path):
    from meanflow.config.overrides import parse_overrides

    err = _one_line(*run(capsys, "train", "--data", "rings", "--out", str(tmp_path / "r"),
                         "--set", "time.ratio", "0.5", "--quiet"))
    assert err.startswith("meanflow: error: unrecognized arguments: 0.5 (did you mean --set "
                          "time.ratio=0.5?)")
    err = _one_line(*run(capsys, "train", "--data", "rings", "--out", str(tmp_path / "r"),
                         "--set", "time.ratio 0.5", "--quiet"))
    assert err == ("meanflow: error: --set expects key=value, got 'time.ratio 0.5'; write --set "
                   "time.ratio=0.5 (no space between the key and its value)")
    with pytest.raises(MeanFlowError, match=r"got 'loss.p'; write --set loss.p=VALUE \(one"):
        parse_overrides(["loss.p"])
    with pytest.raises(MeanFlowError, match="the key is missing"):
        parse_overrides(["=3"])
    assert parse_overrides(["time.ratio=0.5", " loss.p = 1 "]) == [("time.ratio", "0.5"),
                                                                   ("loss.p", "1")]
    assert not (tmp_path / "r").exists()
