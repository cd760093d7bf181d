"""Readers: each format written for real (nibabel, pydicom, numpy, PIL) and read back into a Volume."""
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from sam_peft.data.readers import Volume, display_affine, read_volume, reorient, to_display

RNG = np.random.default_rng(0)


def write_dicom_series(folder, hu, spacing=(2.5, 0.8, 0.7), origin=(-100.0, -80.0, 30.0), order=None, names=None):
    """Write `hu` (slices, rows, cols) as an axial CT series; slice k lies at z = origin_z + k * spacing[0] (LPS)."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    order = range(len(hu)) if order is None else order
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / (names[n] if names else f"slice{n:03d}.dcm")
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[k] + 1024).astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)


def test_nifti_applies_scaling_and_keeps_affine(tmp_path):
    stored = RNG.integers(0, 100, (6, 5, 4)).astype(np.int16)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    image = nib.Nifti1Image(stored, affine)
    image.header.set_slope_inter(2.0, -1000.0)
    nib.save(image, tmp_path / "ct.nii.gz")
    volume = read_volume(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(volume.array, stored * 2.0 - 1000.0)
    np.testing.assert_allclose(volume.affine, affine)
    assert volume.spacing == pytest.approx((0.8, 0.9, 2.5))


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 4, 2)])
def test_nifti_2d_or_4d_is_rejected(tmp_path, shape):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match=r"bad\.nii\.gz: expected a 3D volume"):
        read_volume(tmp_path / "bad.nii.gz")


def test_nifti_trailing_singleton_axis_is_3d(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4, 1), np.int16), np.eye(4)), tmp_path / "x.nii")
    assert read_volume(tmp_path / "x.nii").array.shape == (6, 5, 4)


def test_corrupt_and_missing_files_are_named(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        read_volume(tmp_path / "broken.nii.gz")
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        read_volume(tmp_path / "absent.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_volume(tmp_path / "notes.txt")


def test_dicom_series_sorted_by_position_in_hu_with_ras_affine(tmp_path):
    hu = RNG.integers(-1000, 1500, (5, 6, 7)).astype(np.int16)
    # Files named in an order unrelated to the anatomy: the reader must sort by position.
    write_dicom_series(tmp_path / "series", hu, order=[3, 0, 4, 1, 2])
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.array, hu)
    expected = np.array([
        [0, 0, -0.7, 100.0],  # columns run towards patient left: -x in RAS
        [0, -0.8, 0, 80.0],  # rows run towards posterior: -y in RAS
        [2.5, 0, 0, 30.0],
        [0, 0, 0, 1],
    ])
    np.testing.assert_allclose(volume.affine, expected)
    np.testing.assert_array_equal(to_display(volume).array, hu)  # axial DICOM is already in display order


def test_dicom_series_matches_the_same_volume_as_nifti(tmp_path):
    """DICOM (LPS geometry) and NIfTI (RAS affine) of one volume agree once both are put in display order."""
    hu = RNG.integers(-1000, 1500, (4, 5, 6)).astype(np.int16)
    write_dicom_series(tmp_path / "series", hu)
    ras = reorient(Volume(hu, read_volume(tmp_path / "series").affine, "x"), ("R", "A", "S"))
    nib.save(nib.Nifti1Image(ras.array, ras.affine), tmp_path / "ct.nii.gz")
    from_nifti = to_display(read_volume(tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(from_nifti.array, hu)
    np.testing.assert_allclose(from_nifti.affine, to_display(read_volume(tmp_path / "series")).affine, atol=1e-4)


def test_dicom_missing_slice_and_corrupt_file(tmp_path):
    hu = np.zeros((5, 4, 4), np.int16)
    write_dicom_series(tmp_path / "gap", hu, order=[0, 1, 3, 4])
    with pytest.raises(ValueError, match="non-uniform slice spacing"):
        read_volume(tmp_path / "gap")
    write_dicom_series(tmp_path / "bad", hu)
    (tmp_path / "bad" / "slice002.dcm").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="slice002.dcm"):
        read_volume(tmp_path / "bad")


def test_dicom_folder_ignores_non_dicom_files(tmp_path):
    hu = RNG.integers(-100, 100, (3, 4, 4)).astype(np.int16)
    write_dicom_series(tmp_path / "s", hu, names=["a", "b", "c"])  # suffix-less files, DICM preamble
    (tmp_path / "s" / "README").write_text("not an image")
    np.testing.assert_array_equal(read_volume(tmp_path / "s").array, hu)


def test_npz_keys_and_spacing(tmp_path):
    image, label = RNG.normal(size=(3, 4, 5)), RNG.integers(0, 3, (3, 4, 5))
    np.savez(tmp_path / "a.npz", image=image, label=label, spacing=np.array([3.0, 1.0, 0.5]))
    np.savez(tmp_path / "b.npz", imgs=image, gts=label)
    a, b = read_volume(tmp_path / "a.npz"), read_volume(tmp_path / "b.npz", "label")
    np.testing.assert_array_equal(a.array, image)
    np.testing.assert_array_equal(b.array, label)
    np.testing.assert_allclose(a.affine, display_affine((3.0, 1.0, 0.5)))
    np.testing.assert_array_equal(to_display(a).array, image)  # NPZ arrays are already in display order
    np.savez(tmp_path / "c.npz", data=image)
    with pytest.raises(ValueError, match=r"no image array.*found \['data'\]"):
        read_volume(tmp_path / "c.npz")


def test_png_image_grey_and_label_checks(tmp_path):
    rgb = RNG.integers(0, 255, (6, 8, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    volume = read_volume(tmp_path / "x.png")
    assert volume.array.shape == (1, 6, 8) and volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array[0], np.asarray(Image.fromarray(rgb).convert("L")))
    labels = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    Image.fromarray(labels).save(tmp_path / "label.png")
    np.testing.assert_array_equal(read_volume(tmp_path / "label.png", "label").array[0], labels)
    with pytest.raises(ValueError, match="single-channel"):
        read_volume(tmp_path / "x.png", "label")


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("A", "S", "R"), ("I", "L", "P")])
def test_reorient_round_trip_is_identity_in_display(axcodes):
    array = RNG.normal(size=(3, 4, 5))
    volume = Volume(array, display_affine((3.0, 1.5, 1.0)), "v")
    stored = reorient(volume, axcodes)
    assert nib.aff2axcodes(stored.affine) == axcodes
    shown = to_display(stored)
    np.testing.assert_array_equal(shown.array, array)
    np.testing.assert_allclose(shown.affine, volume.affine)
    assert sorted(stored.spacing) == sorted(volume.spacing)


def test_volume_rejects_empty_and_bad_affine():
    with pytest.raises(ValueError, match="empty"):
        Volume(np.zeros((0, 4, 4)), np.eye(4), "e")
    with pytest.raises(ValueError, match="4x4"):
        Volume(np.zeros((2, 4, 4)), np.eye(3), "a")


def test_display_affine_axes():
    assert nib.aff2axcodes(display_affine()) == ("S", "P", "L")
