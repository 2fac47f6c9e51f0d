"""Caption loaders on tiny files written in the real formats (CUB AttnGAN layout, LN-COCO jsonl, COCO)."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from text2image.caption_data import CUBCaptions, LNCocoCaptions, caption_dataset
from text2image.data import CocoCaptions, load_image

KEYS = ["001.Black_footed_Albatross/Black_Footed_Albatross_0046_18", "002.Laysan_Albatross/Laysan_Albatross_0002_1027"]


def _gradient_image(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    xx, yy = np.meshgrid(np.arange(w), np.arange(h))
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _write_cub(root, n_captions=10):
    cub = root / "CUB_200_2011"
    arrays = {}
    for key in KEYS:
        arrays[key] = _gradient_image(cub / "images" / f"{key}.jpg".replace(".jpg", ".png"), 40, 30)
    # AttnGAN reads .jpg; keep the exact name but PNG bytes are fine for PIL (lossless for the crop check).
    for key in KEYS:
        (cub / "images" / f"{key}.png").rename(cub / "images" / f"{key}.jpg")
    (cub / "images.txt").write_text("".join(f"{i + 1} {k}.jpg\n" for i, k in enumerate(KEYS)))
    (cub / "bounding_boxes.txt").write_text("1 10.0 5.0 8.0 6.0\n2 0.0 0.0 40.0 30.0\n")
    for i, key in enumerate(KEYS):
        p = root / "text" / f"{key}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(f"bird {i} caption {j}" for j in range(n_captions)) + "\n\n")
    for split, keys in (("train", KEYS), ("test", KEYS[:1])):
        (root / split).mkdir(exist_ok=True)
        with open(root / split / "filenames.pickle", "wb") as f:
            pickle.dump(keys, f, protocol=2)
    return arrays


def test_cub_attngan_layout_and_bbox_crop(tmp_path):
    arrays = _write_cub(tmp_path)
    ds = CUBCaptions(tmp_path, "train", caption="all", value_range=(0, 1))
    assert len(ds) == 2 and ds.ids == [1, 2]
    assert ds[0]["caption"] == [f"bird 0 caption {j}" for j in range(10)]
    # AttnGAN get_imgs: r = int(max(8, 6) * 0.75) = 6, centre (14, 8): crop x 8..20, y 2..14
    img = ds[0]["image"]
    ref = torch.from_numpy(arrays[KEYS[0]][2:14, 8:20].copy()).permute(2, 0, 1).float() / 255
    assert img.shape == (3, 12, 12) and torch.allclose(img, ref)
    # second box covers the image: r = 30, centre (20, 15) -> clipped to the full 40 x 30 image
    assert ds[1]["image"].shape == (3, 30, 40)
    test = CUBCaptions(tmp_path, "test", image_size=16, seed=0)
    assert len(test) == 1 and test[0]["image"].shape == (3, 16, 16)
    assert test[0]["caption"] == test[0]["caption"]  # seeded choice is stable


def test_cub_errors_name_the_file(tmp_path):
    _write_cub(tmp_path, n_captions=9)
    with pytest.raises(ValueError, match=r"text/001\.Black.*9 captions, expected 10"):
        CUBCaptions(tmp_path, "train")
    _write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "bounding_boxes.txt").write_text("1 10 5 8\n")
    with pytest.raises(ValueError, match=r"bounding_boxes\.txt:1: expected 5 fields"):
        CUBCaptions(tmp_path, "train")
    with open(tmp_path / "train" / "filenames.pickle", "wb") as f:
        pickle.dump([KEYS[0], 7], f)
    with pytest.raises(ValueError, match=r"filenames\.pickle: entry 1 is 7"):
        CUBCaptions(tmp_path, "train", bbox_crop=False)
    with pytest.raises(ValueError, match="split"):
        CUBCaptions(tmp_path, "val")


def _write_ln(root, lines):
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for i, image_id in enumerate((397133, 37777)):
        _gradient_image(root / "val2017" / f"{image_id:012d}.jpg".replace(".jpg", ".png"), 20, 20)
        (root / "val2017" / f"{image_id:012d}.png").rename(root / "val2017" / f"{image_id:012d}.jpg")
    (ann / "coco_val_localized_narratives.jsonl").write_text("\n".join(lines) + "\n")


def _narrative(image_id, caption, annotator=1):
    return json.dumps({"dataset_id": "mscoco_val2017", "image_id": str(image_id), "annotator_id": annotator,
                       "caption": caption, "timed_caption": [], "traces": [], "voice_recording": "x.ogg"})


def test_lncoco_jsonl(tmp_path):
    _write_ln(tmp_path, [_narrative(397133, "In this image we can see a man."), _narrative(37777, "A kitchen."),
                         _narrative(397133, "There is a person.", 2)])
    ds = caption_dataset("lncoco", tmp_path, "val", 16, max_tokens=64, hflip=False)
    assert len(ds) == 3 and ds.max_tokens == 64        # one item per narrative (XMC-GAN)
    item = ds[0]
    assert item["caption"] == "In this image we can see a man." and item["file_name"] == "000000397133.jpg"
    assert item["image"].shape == (3, 16, 16) and 0 <= item["image"].min() and item["image"].max() <= 1
    grouped = LNCocoCaptions(tmp_path, "annotations/*.jsonl", "val2017", per="image", caption="all")
    assert len(grouped) == 2 and grouped[0]["caption"] == ["In this image we can see a man.", "There is a person."]


@pytest.mark.parametrize("bad,match", [('{"image_id": "397133"}', "KeyError"), ("{not json", "JSONDecodeError"),
                                       (_narrative(397133, ""), "caption is")])
def test_lncoco_malformed_line_names_file_and_line(tmp_path, bad, match):
    _write_ln(tmp_path, [_narrative(397133, "ok"), bad])
    with pytest.raises(ValueError, match=rf"coco_val_localized_narratives\.jsonl:2: malformed.*{match}"):
        caption_dataset("lncoco", tmp_path, "val", 16)


def _write_coco(root, annotations, split="train2014"):
    (root / "annotations").mkdir(parents=True)
    _gradient_image(root / split / "a.png", 24, 18)
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco))


def test_coco_malformed_annotation_names_file_and_entry(tmp_path):
    _write_coco(tmp_path, [{"id": 1, "image_id": 1, "caption": "ok"}, {"id": 2, "image_id": 1}])
    with pytest.raises(ValueError, match=r"captions_train2014\.json: malformed annotations\[1\].*KeyError"):
        caption_dataset("coco", tmp_path, "train", 16)


def test_coco_pipeline_is_plain_bilinear_in_unit_range(tmp_path):
    _write_coco(tmp_path, [{"id": i, "image_id": 1, "caption": f"c{i}"} for i in range(5)])
    ds = caption_dataset("coco", tmp_path, "train", 8, hflip=False, caption="random", seed=3)
    img = ds[0]["image"]
    ref = load_image(tmp_path / "train2014" / "a.png", 8, (0, 1), antialias=False)
    assert torch.equal(img, ref) and not torch.allclose(img, load_image(tmp_path / "train2014" / "a.png", 8, (0, 1)))
    # a seeded "random" caption: a fixed one per (epoch, image), any of the 5 over epochs
    seen = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        seen.add(ds[0]["caption"])
        assert ds[0]["caption"] == ds[0]["caption"]
    assert seen == {f"c{i}" for i in range(5)}
    flips = caption_dataset("coco", tmp_path, "train", 8, hflip=True)
    torch.manual_seed(0)
    outs = {bool(torch.equal(flips[0]["image"], img)) for _ in range(20)}
    assert outs == {True, False}
    assert isinstance(ds, CocoCaptions)
