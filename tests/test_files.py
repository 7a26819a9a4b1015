"""Nothing of the user's is ever lost, and failures leave no trace: destination checks,
`--overwrite` of our own folders only, side files copied without following links out or
widening permissions, concurrent writers, stale temporaries."""

import os
import shutil

import pytest
from safety_cases import foreign_hf_folder, leftovers, snapshot, tiny_model

import eqx_models
from eqx_models.cli import main as cli


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


def test_convert_into_the_sources_parent_is_refused_and_loses_nothing(tmp_path, capsys):
    foreign_hf_folder(tmp_path / "x" / "model")
    (tmp_path / "x" / "sibling").mkdir()
    (tmp_path / "x" / "sibling" / "data.txt").write_text("precious\n")
    before = snapshot(tmp_path)
    assert cli(["convert", str(tmp_path / "x" / "model"), str(tmp_path / "x")]) != 0
    assert snapshot(tmp_path) == before
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("spelling", ["same", "dot", "trailing-slash", "link"])
def test_convert_onto_its_own_source_is_refused(tmp_path, spelling):
    source = foreign_hf_folder(tmp_path / "model")
    (tmp_path / "alias").symlink_to(source)
    dst = {
        "same": str(source),
        "dot": str(source / "."),
        "trailing-slash": str(source) + "/",
        "link": str(tmp_path / "alias" / "."),
    }[spelling]
    before = snapshot(tmp_path)
    assert (
        cli(["convert", str(source), dst, "--overwrite"] if spelling == "same" else ["convert", str(source), dst]) != 0
    )
    assert snapshot(tmp_path) == before


def test_convert_to_the_current_folder_or_its_parent_is_refused(tmp_path, monkeypatch):
    source = foreign_hf_folder(tmp_path / "src")
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for dst in (".", "..", "./", str(work)):
        assert cli(["convert", str(source), dst]) != 0, dst
    assert snapshot(tmp_path) == before


def test_a_non_empty_foreign_destination_is_never_replaced(tmp_path, model):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine\n")
    (dst / "sub").mkdir()
    (dst / "sub" / "deep.txt").write_text("also mine\n")
    before = snapshot(tmp_path)
    with pytest.raises(eqx_models.EqxModelsError, match="not empty"):
        eqx_models.save_pretrained(model, dst)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "link-to-folder", "dangling-link"])
def test_a_destination_that_is_a_file_or_a_link_is_refused_and_leaves_nothing(tmp_path, model, kind):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "kept.txt").write_text("kept\n")
    dst = tmp_path / "dst"
    if kind == "file":
        dst.write_text("a file\n")
    elif kind == "link-to-folder":
        dst.symlink_to(tmp_path / "target")
    else:
        dst.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path)
    with pytest.raises(eqx_models.EqxModelsError):
        eqx_models.save_pretrained(model, dst)
    assert snapshot(tmp_path) == before


def test_side_files_never_follow_links_out_of_the_source(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    secret.chmod(0o600)
    source = foreign_hf_folder(tmp_path / "src")
    (source / "vocab.json").symlink_to(secret)
    assert cli(["convert", str(source), str(tmp_path / "out")]) != 0
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_side_files_are_never_more_readable_than_their_source(tmp_path):
    source = foreign_hf_folder(tmp_path / "src")
    (source / "tokenizer_config.json").chmod(0o600)
    old = os.umask(0o022)
    try:
        assert cli(["convert", str(source), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "tokenizer_config.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    shutil.rmtree(tmp_path / "out")
