"""The web app's session handlers, without a browser: real LiteMedSAM on a crop of the real CT, real files."""
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import aff2axcodes
from scipy import ndimage
from test_models import tiny_sam_config
from test_predict import _write_dicom_series
from transformers import SamModel

from sam_peft.app import state
from sam_peft.app.state import AppModel, open_example, open_upload
from sam_peft.cli import main
from sam_peft.data import Volume, read_volume, to_display
from sam_peft.data.readers import reorient
from sam_peft.evaluation import MultiOrganPredictor
from sam_peft.models import apply_lora, save_adapter
from sam_peft.models.decoding import sam_of

LIVER = 5  # TotalSegmentator id
CROP = (98, 101)  # display slices with a large liver

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def app(litemedsam) -> AppModel:
    return AppModel.create(litemedsam, "LiteMedSAM")


@pytest.fixture(scope="module")
def crop(totalseg_dir, tmp_path_factory):
    """CROP of the real CT saved as NIfTI in the CT's own (non-display) orientation, and its display labels."""
    source = read_volume(totalseg_dir / "example_ct.nii.gz")
    image = to_display(source)
    label = to_display(read_volume(totalseg_dir / "example_seg_fast_force_split.nii.gz", "label")).array
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, 0] * CROP[0]
    stored = reorient(Volume(image.array[CROP[0]:CROP[1]], affine, "crop"), aff2axcodes(source.affine))
    path = tmp_path_factory.mktemp("upload") / "crop_ct.nii.gz"
    nib.save(nib.Nifti1Image(stored.array.astype(np.int16), stored.affine), path)
    return path, label[CROP[0]:CROP[1]] == LIVER


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _box_clicks(session, app, z, mask, organ="liver") -> None:
    ys, xs = np.nonzero(mask)
    session.click(app, z, int(xs.min()), int(ys.min()), organ, "box corner")
    session.click(app, z, int(xs.max()), int(ys.max()), organ, "box corner")


def _inside(mask: np.ndarray) -> tuple[int, int]:
    """The pixel deepest inside a mask (x, y): where a person clicks to say "this"."""
    y, x = np.unravel_index(ndimage.distance_transform_edt(mask).argmax(), mask.shape)
    return int(x), int(y)


def test_clicks_refine_from_previous_logits_encode_once_and_undo(app, crop, litemedsam):
    path, liver = crop
    session, other = open_upload(app, path), open_upload(app, path)
    z = 1
    encoded = []
    hook = sam_of(litemedsam).vision_encoder.register_forward_hook(lambda m, args, out: encoded.append(1))
    try:
        _box_clicks(session, app, z, liver[z])
        box_labels = session.labels.copy()
        assert _dice(box_labels[z] == LIVER, liver[z]) > 0.85  # zero-shot tight box on this CT: 0.92 mean
        previous = session.edits[z]["liver"][-1].prediction
        x, y = _inside(liver[z])
        message = session.click(app, z, x, y, "liver", "positive click")
    finally:
        hook.remove()
    assert encoded == [1]  # one encoder pass for the slice, three clicks answered from it
    assert f"({x}, {y})" in message
    step = session.edits[z]["liver"][-1]
    assert step.prompt["points"] == [[x, y]] and step.prompt["labels"] == [1] and "box" in step.prompt
    fresh = MultiOrganPredictor(litemedsam)
    fresh.set_image(session.pixels[z])
    expected = fresh.predict({"liver": step.prompt}, mask_inputs={"liver": previous.low_res_logits})["liver"]
    np.testing.assert_array_equal(step.prediction.mask, expected.mask)  # refined from the box's logits
    assert not other.labels.any() and not other.edits and not other.encoded  # the other session saw nothing

    session.undo(app, z, "liver")
    np.testing.assert_array_equal(session.labels, box_labels)
    session.click(app, z, x, y, "liver", "box corner")  # a half-drawn box goes first on undo
    assert "corner removed" in session.undo(app, z, "liver")
    session.undo(app, z, "liver")
    assert not session.labels.any()
    assert "nothing to undo" in session.undo(app, z, "liver")


def test_propagate_fills_neighbours_and_export_keeps_grid(app, crop, tmp_path):
    path, liver = crop
    session = open_upload(app, path)
    _box_clicks(session, app, 1, liver[1])
    accepted = session.labels[1].copy()
    with pytest.raises(ValueError, match="no organ has a mask on slice 0"):
        session.propagate(app, 0)
    message = session.propagate(app, 1)
    assert "liver on slices 0-2" in message
    np.testing.assert_array_equal(session.labels[1], accepted)  # the prompted slice keeps the person's mask
    for z in (0, 2):
        assert _dice(session.labels[z] == LIVER, liver[z]) > 0.85

    nifti, sidecar = session.export(app)
    written, source = nib.load(nifti), nib.load(path)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    labels = to_display(read_volume(nifti, "label")).array
    np.testing.assert_array_equal(labels, session.labels)
    info = json.loads(sidecar.read_text())
    assert info["labels"] == {str(LIVER): "liver"} and info["voxels"]["liver"] == (labels == LIVER).sum()
    assert info["volumes_ml"]["liver"] == pytest.approx((labels == LIVER).sum() * 27 / 1000, abs=0.01)  # 3 mm voxels

    assert "cleared" in session.clear(app, "liver")
    assert not session.labels.any() and not session.propagated.any()


def test_render_shows_window_overlay_and_prompts(app, crop):
    path, liver = crop
    session = open_upload(app, path)
    session.labels[1][liver[1]] = LIVER  # a mask as a propagation would leave it
    s = session.display_scale
    plain = session.render(app, 1, "abdomen", overlay=False)
    assert plain.shape == (liver.shape[1] * s, liver.shape[2] * s, 3) and max(plain.shape[:2]) >= state.DISPLAY_SIDE
    assert not np.array_equal(plain, session.render(app, 1, "bone", overlay=False))
    shown = session.render(app, 1, "abdomen", overlay=True)
    y, x = (c * s for c in _inside(liver[1])[::-1])
    colour = state.organ_colour(app, "liver").astype(float)
    np.testing.assert_allclose(shown[y, x], 0.55 * plain[y, x] + 0.45 * colour, atol=1)
    ys, xs = np.nonzero(~liver[1])
    np.testing.assert_array_equal(shown[ys[0] * s, xs[0] * s], plain[ys[0] * s, xs[0] * s])
    session.corner = (1, "liver", (5, 5))
    assert not np.array_equal(session.render(app, 1, "abdomen", overlay=False), plain)  # the pending corner


def test_bad_input_is_refused_with_the_file_name(app, crop, tmp_path):
    path, _ = crop
    (tmp_path / "notes.nii.gz").write_text("not a volume")
    (tmp_path / "notes.txt").write_text("hello")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), tmp_path / "dynamic.nii.gz")
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        archive.writestr("a/readme.md", "no DICOM here")
    cases = {"notes.nii.gz": "cannot read NIfTI", "notes.txt": "not a file this app opens",
             "dynamic.nii.gz": "expected a 3D volume", "broken.zip": "not a readable zip",
             "photos.zip": "no DICOM files found"}
    for name, reason in cases.items():
        with pytest.raises(ValueError, match=reason) as error:
            open_upload(app, tmp_path / name)
        assert name in str(error.value) and str(tmp_path) not in str(error.value)
    with pytest.raises(ValueError, match="over this app's upload limit of 0.01 MB"):
        open_upload(app, path, max_mb=0.01)

    session = open_upload(app, path)
    for call, reason in ((lambda: session.click(app, 1, 500, 5, "liver", "positive click"), "outside the 122x101"),
                         (lambda: session.click(app, 1, -1, 5, "liver", "positive click"), "outside"),
                         (lambda: session.click(app, 9, 5, 5, "liver", "positive click"), "slice 9 is outside"),
                         (lambda: session.click(app, 1, 5, 5, "brain stem", "positive click"), "not in the label map"),
                         (lambda: session.click(app, 1, 5, 5, "liver", "lasso"), "prompt mode"),
                         (lambda: session.propagate(app, 1, reach=-1), "reach must be")):
        with pytest.raises(ValueError, match=reason):
            call()
    assert not session.encoded  # nothing reached the model


def test_zipped_dicom_series_opens_without_trusting_archive_paths(app, crop, tmp_path):
    path, _ = crop
    hu = np.clip(to_display(read_volume(path)).array, -1024, None).astype(np.int16)  # the series stores HU + 1024
    _write_dicom_series(tmp_path / "series", hu, 3.0)
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as archive:
        for i, file in enumerate(sorted((tmp_path / "series").iterdir())):
            archive.write(file, f"../../escape/{file.name}" if i == 0 else f"study/series/{file.name}")
    session = open_upload(app, tmp_path / "series.zip")
    assert session.pixels.shape == hu.shape and session.modality == "ct"
    np.testing.assert_array_equal(session.display.array, hu)
    assert not (tmp_path.parent / "escape").exists()


def test_example_falls_back_to_a_phantom(app, monkeypatch, tmp_path):
    monkeypatch.setattr(state, "EXAMPLE_CT", tmp_path / "absent.nii.gz")
    session = open_example(app)
    assert session.name == "phantom_ct.nii.gz" and session.pixels.shape == (32, 160, 160)
    assert session.modality == "ct"
    session.close()
    assert not session.source.exists()


def test_cli_refuses_an_adapter_for_another_base(tmp_path, capsys):
    torch.manual_seed(0)
    save_adapter(apply_lora(SamModel(tiny_sam_config()).eval(), preset="decoder", r=2, verbose=False),
                 tmp_path / "adapter")
    assert main(["app", "--adapter", str(tmp_path / "adapter"), "--port", "7999"]) == 2
    assert "adapter was made for base" in capsys.readouterr().err
