"""Benchmark layouts parsed from small fake trees."""

import random

import numpy as np
import pytest
from PIL import Image

from musc_tasks.datasets import DEFAULT_RSCIN_K, choose_shots, dataset_images, list_categories, train_good_images


def png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_mvtec(tmp_path):
    png(tmp_path / "bottle/test/good/000.png")
    png(tmp_path / "bottle/test/broken_large/000.png")
    png(tmp_path / "bottle/ground_truth/broken_large/000_mask.png", 255)
    png(tmp_path / "bottle/train/good/000.png")
    assert list_categories(tmp_path, "mvtec") == ["bottle"]
    images = dataset_images(tmp_path, "mvtec", "bottle")
    assert [(i.relpath, i.is_anomalous) for i in images] == [("broken_large/000.png", True), ("good/000.png", False)]
    assert images[0].mask_path == tmp_path / "bottle/ground_truth/broken_large/000_mask.png"
    assert images[1].mask_path is None


def test_btad(tmp_path):
    png(tmp_path / "01/test/ok/0000.png")
    png(tmp_path / "01/test/ko/0001.bmp")
    png(tmp_path / "01/ground_truth/ko/0001.png", 255)
    images = dataset_images(tmp_path, "btad", "01")
    assert [(i.defect_type, i.is_anomalous, i.mask_path is not None) for i in images] == [
        ("ko", True, True),
        ("ok", False, False),
    ]
    assert DEFAULT_RSCIN_K["btad"] == (1, 2, 3)


def test_visa_from_csv_and_from_folders(tmp_path):
    png(tmp_path / "candle/Data/Images/Normal/0000.JPG")
    png(tmp_path / "candle/Data/Images/Anomaly/0001.JPG")
    png(tmp_path / "candle/Data/Masks/Anomaly/0001.png", 255)
    from_folders = dataset_images(tmp_path, "visa", "candle")
    assert [(i.defect_type, i.is_anomalous) for i in from_folders] == [("Anomaly", True), ("Normal", False)]
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/0001.JPG,candle/Data/Masks/Anomaly/0001.png\n"
    )
    assert list_categories(tmp_path, "visa") == ["candle"]
    from_csv = dataset_images(tmp_path, "visa", "candle")
    assert [(i.path, i.mask_path) for i in from_csv] == [(i.path, i.mask_path) for i in from_folders]
    assert DEFAULT_RSCIN_K["visa"] == (1, 8, 9)


def test_errors_name_the_problem(tmp_path):
    png(tmp_path / "bottle/test/crack/000.png")
    with pytest.raises(FileNotFoundError, match="000_mask.png"):
        dataset_images(tmp_path, "mvtec", "bottle")
    with pytest.raises(ValueError, match="layout"):
        dataset_images(tmp_path, "kolektor", "bottle")


def test_train_images_and_seeded_shots(tmp_path):
    for name in ("002.png", "000.png", "001.png", "003.png"):
        png(tmp_path / "bottle/train/good" / name)
    png(tmp_path / "01/train/ok/0000.bmp")
    (tmp_path / "bottle/train/good/notes.txt").write_text("not an image")
    files = train_good_images(tmp_path, "mvtec", "bottle")
    assert [p.name for p in files] == ["000.png", "001.png", "002.png", "003.png"]
    assert [p.name for p in train_good_images(tmp_path, "btad", "01")] == ["0000.bmp"]
    # the documented rule, whatever order the files come in
    assert choose_shots(files[::-1], 2, seed=3) == random.Random(3).sample(files, 2)
    draws = {tuple(choose_shots(files, 2, seed)) for seed in range(20)}
    assert len(draws) > 1 and all(len(set(d)) == 2 for d in draws)
    with pytest.raises(ValueError, match="cannot choose 5 of 4"):
        choose_shots(files, 5, 0)
    with pytest.raises(ValueError, match="cannot choose 0 of 4"):
        choose_shots(files, 0, 0)
    with pytest.raises(FileNotFoundError, match="no train folder .*screw/train/good"):
        train_good_images(tmp_path, "mvtec", "screw")


def test_visa_train_rows(tmp_path):
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0002.JPG,\n"
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,\n"
    )
    assert [p.relative_to(tmp_path).as_posix() for p in train_good_images(tmp_path, "visa", "candle")] == [
        "candle/Data/Images/Normal/0000.JPG",
        "candle/Data/Images/Normal/0001.JPG",
    ]
    with pytest.raises(FileNotFoundError, match="no normal train row for 'fryum'"):
        train_good_images(tmp_path, "visa", "fryum")
