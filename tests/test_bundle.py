"""Bundles: prepared with the tiny model, round-tripped, verified, and refused for another model."""
import json
import shutil

import numpy as np
import pytest

from pipeline.bundle import BundleError, load_bundle, prepare_bundle, save_bundle
from pipeline.classes import ClassesError, classes_from_folder, classes_from_list
from pipeline.lexicon import cache_key, load_lexicon
from pipeline.selection import base_similarity
from schemas.settings import ClassesSettings


def test_prepared_bundle_round_trip(tiny_bundle_dir, tiny_model, tiny_settings):
    bundle = load_bundle(tiny_bundle_dir, model_id=tiny_model.model_id)
    assert bundle.class_names == ["blue circle", "green square", "red circle"]
    assert bundle.id_text.shape == (3, 64) and bundle.prototypes.shape == (3, 64)
    negatives, words = bundle.negatives("interneg")
    assert len(words) == len(negatives) == 200
    np.testing.assert_allclose(np.load(tiny_bundle_dir / "base_similarity.npy"), base_similarity(bundle.id_text, bundle.prototypes), atol=1e-6)
    # the ID text embedding is exactly the encoder's output for the prompt
    np.testing.assert_allclose(bundle.id_text[0], tiny_model.encode_texts(["The nice blue circle."])[0], atol=1e-6)
    # MCM's prompt has no full stop, as MCM's released code
    np.testing.assert_allclose(bundle.state("mcm").arrays["id_text"][0], tiny_model.encode_texts(["a photo of a blue circle"])[0], atol=1e-6)
    # every chosen InterNeg negative is admissible: farther from each prototype than its label text
    sims = negatives @ bundle.prototypes.T
    assert (sims < bundle.base_similarity[None, :]).all()
    manifest = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    assert manifest["model_id"] == "interneg-tiny/random-seed0"
    # 15 % of each part of the lexicon, after dropping the three class names (none is a WordNet word)
    assert manifest["info"]["methods"]["neglabel"]["negatives"] == int(0.15 * 58514) + int(0.15 * 12280)
    # each method's state under its own name
    assert set(manifest["files"]) >= {"id_text.npy", "prototypes.npy", "interneg.negatives.faiss", "interneg.words.json",
                                      "neglabel.negatives.npy", "adaneg.negatives.npy", "mcm.id_text.npy"}
    assert set(manifest["methods"]) == set(tiny_settings.method.bundled) == {"mcm", "neglabel", "adaneg", "interneg"}
    with pytest.raises(BundleError, match="prepared without method 'csp'.*--methods csp"):
        bundle.state("csp")


def test_lexicon_embeddings_are_cached_per_model(tiny_bundle_dir, tiny_model, tiny_settings):
    lexicon = load_lexicon()
    cached = tiny_settings.cache_dir / "text-embeddings" / f"{cache_key(tiny_model.model_id, lexicon.prompts)}.npy"
    assert cached.exists()
    assert np.load(cached).shape == (len(lexicon.words), 64)
    assert cache_key("other-model", lexicon.prompts) != cache_key(tiny_model.model_id, lexicon.prompts)


def test_bundle_from_another_model_is_refused(tiny_bundle_dir):
    with pytest.raises(BundleError, match="prepared with model interneg-tiny/random-seed0, but the loaded model is ViT-B-16/openai"):
        load_bundle(tiny_bundle_dir, model_id="ViT-B-16/openai")


def test_tampered_bundle_is_refused(tiny_bundle_dir, tmp_path):
    copy = shutil.copytree(tiny_bundle_dir, tmp_path / "copy")
    arr = np.load(copy / "id_text.npy")
    arr[0, 0] += 1
    np.save(copy / "id_text.npy", arr)
    with pytest.raises(BundleError, match="id_text.npy: content does not match"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not a detector bundle"):
        load_bundle(tmp_path)


def test_a_bundle_reads_only_its_own_plain_files_that_the_manifest_hashes(tiny_bundle_dir, tmp_path):
    """A manifest is data from whoever wrote the folder: a path out of it, a link to elsewhere
    or a file it does not hash must not be read."""
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros((1, 1), np.float32))

    def tampered(name, change):
        copy = shutil.copytree(tiny_bundle_dir, tmp_path / name)
        manifest = json.loads((copy / "manifest.json").read_text())
        change(copy, manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy

    def escape(copy, manifest):
        manifest["files"]["../outside.npy"] = manifest["files"]["id_text.npy"]
        manifest["extras"] = ["../../outside"]

    with pytest.raises(BundleError, match="'../outside.npy', which is not a file name in the bundle folder"):
        load_bundle(tampered("escape", escape))

    def link(copy, manifest):
        (copy / "id_text.npy").unlink()
        (copy / "id_text.npy").symlink_to(outside)

    with pytest.raises(BundleError, match="id_text.npy: a symbolic link"):
        load_bundle(tampered("link", link))

    def unlisted(copy, manifest):
        del manifest["files"]["id_text.npy"]

    with pytest.raises(BundleError, match="id_text.npy is not listed in the manifest"):
        load_bundle(tampered("unlisted", unlisted))


def test_class_list_falls_back_to_neglabel_selection(tiny_model, tiny_settings, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("# camera 3\ndog\ncar\n\nbicycle\n")
    bundle = prepare_bundle(tiny_model, names, tiny_settings)
    assert bundle.prototypes is None
    assert bundle.negatives("interneg")[1] == bundle.negatives("neglabel")[1]
    assert "inter-modal selection and inversion are unavailable" in bundle.state("interneg").info["selection_note"]
    assert not {"dog", "car", "bicycle"} & set(bundle.negatives("neglabel")[1])  # ID names are never negatives
    save_bundle(bundle, tmp_path / "b")
    assert load_bundle(tmp_path / "b").prototypes is None


def test_class_folder_errors_name_the_folder(tmp_path):
    root = tmp_path / "classes"
    (root / "empty").mkdir(parents=True)
    with pytest.raises(ClassesError, match="empty: class 'empty' has no example images"):
        classes_from_folder(root, ClassesSettings())
    (root / "empty" / "a.png").write_bytes(b"x")
    with pytest.raises(ClassesError, match="has 1 example image\\(s\\), fewer than INTERNEG_CLASSES__MIN_EXAMPLES=2"):
        classes_from_folder(root, ClassesSettings())
    assert classes_from_folder(root, ClassesSettings(min_examples=1)).names == ["empty"]
    with pytest.raises(ClassesError, match="no class sub-folders"):
        classes_from_folder(tmp_path / "classes" / "empty", ClassesSettings())
    dup = tmp_path / "dup.txt"
    dup.write_text("Dog\ndog\n")
    with pytest.raises(ClassesError, match="repeated class names: dog"):
        classes_from_list(dup)


def test_unreadable_example_image_names_the_file(tiny_model, tiny_settings, tmp_path):
    root = tmp_path / "classes"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "good.png").write_bytes((tiny_bundle_image := _png()))
    (root / "cat" / "broken.png").write_bytes(tiny_bundle_image[:40])
    with pytest.raises(ValueError, match="broken.png"):
        prepare_bundle(tiny_model, root, tiny_settings)


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()
