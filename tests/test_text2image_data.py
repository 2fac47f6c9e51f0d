"""text2image.data (COCO captions, shapes attributes, ImageFolder) and text2image.text_encoder."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cmgen.data import SHAPES, write_shapes
from text2image.data import CocoCaptions, ShapesAttributes, class_conditional_imagefolder
from text2image.text_encoder import TextEncoder, default_text_encoder_path


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, num_images=40, image_size=32, seed=3, val_fraction=0.25, captions_per_image=3,
                 progress=False)
    return root


@pytest.fixture(scope="module")
def packaged_encoder():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield TextEncoder()
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _coco(root, split="train"):
    with open(root / "annotations" / f"captions_{split}.json") as f:
        coco = json.load(f)
    caps = {}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        caps.setdefault(ann["image_id"], []).append(ann["caption"])
    return coco, caps


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_coco_captions_items_match_json(shapes_root, value_range):
    coco, caps = _coco(shapes_root)
    ds = CocoCaptions(shapes_root, "annotations/captions_train.json", "train", caption="all",
                      value_range=value_range)
    assert len(ds) == len(coco["images"]) == 30
    assert ds.num_missing == 0 and ds.num_uncaptioned == 0
    lo, hi = value_range
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["caption"] == caps[item["image_id"]]
        assert len(item["caption"]) == 3
    img = ds[0]["image"]
    # black background and saturated shapes reach both ends of the range
    assert img.min().item() == pytest.approx(lo) and img.max().item() <= hi + 1e-6
    assert img.max().item() > lo + 0.5 * (hi - lo)


def test_coco_first_random_resize_and_loader(shapes_root):
    _, caps = _coco(shapes_root, "val")
    first = CocoCaptions(shapes_root, "annotations/captions_val.json", "val", caption="first", image_size=16)
    assert len(first) == 10
    for i in range(len(first)):
        item = first[i]
        assert item["caption"] == caps[item["image_id"]][0] and item["image"].shape == (3, 16, 16)
    rnd = CocoCaptions(shapes_root, "annotations/captions_val.json", "val", seed=0)
    seen = set()
    for _ in range(20):
        item = rnd[0]
        assert item["caption"] == caps[item["image_id"]][item["caption_index"]]
        seen.add(item["caption_index"])
    assert len(seen) == 1  # seeded: same (epoch, index) -> same caption
    batch = next(iter(DataLoader(rnd, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4


def test_seeded_caption_choice_is_deterministic_and_varies(shapes_root):
    kw = dict(root=shapes_root, ann_file="annotations/captions_train.json", image_dir="train", seed=7)
    a, b = CocoCaptions(**kw), CocoCaptions(**kw)
    picks = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        pa = [a.caption_choice(i) for i in range(len(a))]
        assert pa == [b.caption_choice(i) for i in range(len(b))]
        assert [a[i]["caption_index"] for i in range(3)] == pa[:3]
        picks.append(pa)
    assert picks[0] != picks[1]  # a new epoch draws new captions
    assert set(picks[0]) == {0, 1, 2}
    other = CocoCaptions(**{**kw, "seed": 8})
    assert [other.caption_choice(i) for i in range(len(other))] != picks[0]


def test_missing_image_error_names_file_and_skip_counts(shapes_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shapes_root / "annotations", root / "annotations")
    shutil.copytree(shapes_root / "train", root / "train")
    victim = sorted((root / "train").iterdir())[4]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        CocoCaptions(root, "annotations/captions_train.json", "train")
    ds = CocoCaptions(root, "annotations/captions_train.json", "train", missing="skip")
    assert len(ds) == 29 and ds.num_missing == 1 and ds.missing_files[0].endswith(victim.name)
    assert victim.name not in ds.file_names
    with pytest.raises(FileNotFoundError, match="captions_nope.json"):
        CocoCaptions(root, "annotations/captions_nope.json", "train")
    with pytest.raises(ValueError, match="caption must be one of"):
        CocoCaptions(root, "annotations/captions_train.json", "train", caption="longest", missing="skip")
    with pytest.raises(ValueError, match="value_range"):
        CocoCaptions(root, "annotations/captions_train.json", "train", value_range=(1, 0), missing="skip")


def test_shapes_attributes_agree_with_imagefolder(shapes_root):
    attrs = ShapesAttributes(shapes_root, split="train")
    assert attrs.classes == list(SHAPES) and attrs.num_classes == 5 and len(attrs) == 30
    for aligned in (False, True):
        folder = class_conditional_imagefolder(shapes_root / "imagefolder" / "train",
                                               classes=attrs.classes if aligned else None)
        assert len(folder) == 30
        if not aligned:
            assert folder.classes == sorted(SHAPES)
        for path, target in folder.samples:
            name = os.path.basename(path)
            assert folder.classes[target] == attrs.classes[attrs.file_labels[name]]
            if aligned:
                assert target == attrs.file_labels[name]
    image, target = folder[0]
    assert image.shape == (3, 32, 32) and -1.0 <= image.min() and image.max() <= 1.0
    # labels by COCO image id, as a class-conditional GAN or a shapes classifier would use them
    ds = CocoCaptions(shapes_root, "annotations/captions_train.json", "train", caption="first")
    labels = attrs.labels_for([ds[i]["image_id"] for i in range(len(ds))])
    assert labels.shape == (30,) and sorted(set(labels.tolist())) == list(range(5))
    for i in range(len(ds)):  # the primary shape is named in every caption
        assert SHAPES[int(labels[i])] in ds[i]["caption"]
    with pytest.raises(KeyError, match="999999"):
        attrs.label(999999)


def test_tiny_random_encoder_without_files(shapes_root):
    enc = TextEncoder.from_config(random_init=True, hidden=32, layers=2)
    assert enc.dim == 32 and enc.path is None
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen: dropout stays off
    caps = ["a red circle", "a large blue square in the top left and a small star"]
    words, mask, sentence = enc.encode(caps)
    assert words.shape == (2, 17, 32) and mask.shape == (2, 17) and sentence.shape == (2, 32)
    assert mask.dtype == torch.bool
    # [CLS] + 12 characters/word pieces ("a", "r ##e ##d", ...) + [SEP]
    assert mask[0].sum().item() == 1 + len("aredcircle") + 1 and mask[1].all()
    ref = torch.stack([words[b, mask[b]].double().mean(0) for b in range(2)]).float()
    torch.testing.assert_close(sentence, ref)
    again = TextEncoder.from_config(hidden=32, layers=2).encode(caps)[2]
    torch.testing.assert_close(again, sentence)  # weights are a function of the seed
    # the same tokenizer drives CocoCaptions; encode_tokens on its batch equals encode on the text
    ds = CocoCaptions(shapes_root, "annotations/captions_val.json", "val", caption="first",
                      tokenizer=enc.tokenizer, max_tokens=17)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["input_ids"].shape == (3, 17) and batch["attention_mask"].shape == (3, 17)
    w_tok, m_tok, s_tok = enc.encode_tokens(batch["input_ids"], batch["attention_mask"])
    w_txt, m_txt, s_txt = enc.encode(list(batch["caption"]))
    assert torch.equal(m_tok, m_txt)
    torch.testing.assert_close(s_tok, s_txt)
    with pytest.raises(ValueError, match="random_init"):
        TextEncoder.from_config(random_init=False)
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder.from_config(pooling="max")


def test_trainable_encoder_gets_gradients():
    enc = TextEncoder.from_config(hidden=16, layers=1, freeze=False, pooling="cls")
    words, mask, sentence = enc.encode(["a circle", "a star"])
    sentence.sum().backward()
    assert enc.model.embeddings.word_embeddings.weight.grad is not None
    torch.testing.assert_close(sentence, words[:, 0])


def test_missing_weights_error_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        TextEncoder(path=tmp_path / "nothing")
    (tmp_path / "noweights").mkdir()
    shutil.copy(default_text_encoder_path() / "config.json", tmp_path / "noweights" / "config.json")
    with pytest.raises(FileNotFoundError, match="noweights"):
        TextEncoder(path=tmp_path / "noweights")


def test_packaged_encoder_offline_shapes_mask_and_mean(packaged_encoder):
    enc = packaged_encoder
    assert enc.dim == 384 and enc.max_tokens == 17
    assert enc.path == str(default_text_encoder_path())
    caps = ["a red circle", "a small red circle in the top left and a large blue square in the center "
            "of a black picture with many more words than fit", "star"]
    words, mask, sentence = enc.encode(caps)
    assert words.shape == (3, 17, 384) and sentence.shape == (3, 384)
    ref_mask = enc.tokenizer(caps, max_length=17, padding="max_length", truncation=True,
                             return_tensors="pt")["attention_mask"].bool()
    assert torch.equal(mask, ref_mask)
    assert mask[1].all() and mask[2].sum().item() == 3  # truncated to 17; [CLS] star [SEP]
    ids = enc.tokenize(caps)["input_ids"]
    assert ids[1, -1].item() == enc.tokenizer.sep_token_id and ids[1, 0].item() == enc.tokenizer.cls_token_id
    for b in range(3):  # independent float64 loop: mean of the valid token outputs ([CLS], words, [SEP])
        n = int(ref_mask[b].sum())
        ref = sum(words[b, t].double() for t in range(n)) / n
        torch.testing.assert_close(sentence[b].double(), ref, rtol=1e-5, atol=1e-6)
    # XMC-GAN's preprocess_data.py: sum over all 17 positions (padding outputs included) / valid count
    enc.pooling = "official_sum"
    try:
        official = enc.encode(caps)[2]
    finally:
        enc.pooling = "mean"
    torch.testing.assert_close(official[2], words[2].sum(0) / 3)
    assert not torch.allclose(official[0], sentence[0], atol=1e-3)  # padding outputs are not zero
    torch.testing.assert_close(official[1], sentence[1])  # no padding -> identical


def test_packaged_encoder_semantics(packaged_encoder):
    _, _, s = packaged_encoder.encode(["a red circle", "a red circle in the center", "a large blue square"])
    s = F.normalize(s, dim=-1)
    close, far1, far2 = (s[0] @ s[1]).item(), (s[0] @ s[2]).item(), (s[1] @ s[2]).item()
    assert close > far1 + 0.2 and close > far2 + 0.2
