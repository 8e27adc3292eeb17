"""The DataModule on the bundled digits: batches, seeded splits, flips, configs, Lightning, preview."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from diffusion_lab.data import DiffusionDataModule, MissingDataError, TensorBatches
from diffusion_lab.data.digits import DIGITS_COUNT

CONF = Path(__file__).resolve().parents[2] / "conf"
DIGITS_HIST = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _digits(cache, **kw):
    return DiffusionDataModule(name="digits", cache_dir=cache, **kw)


def test_attributes_before_any_loading(tmp_path):
    dm = _digits(tmp_path / "c")
    assert (dm.name, dm.image_size, dm.channels, dm.num_classes) == ("digits", 16, 1, 10)
    assert not (tmp_path / "c").exists()


def test_digits_real_content(cache):
    from sklearn.datasets import load_digits

    dm = _digits(cache, image_size=8)
    dm.prepare_data()
    entry = dm.load_part("all")
    x, y = entry["images"], entry["labels"]
    assert x.shape == (DIGITS_COUNT, 1, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == DIGITS_HIST
    raw = load_digits()
    expected = np.round(raw.images * (255 / 16)).astype(np.uint8)  # 0-16 rescaled, ink bright
    assert np.array_equal(x[:, 0].numpy(), expected) and np.array_equal(y.numpy(), raw.target)
    assert int(x[0].sum()) == int(expected[0].sum())


def test_digits_upsampled(cache):
    dm = _digits(cache)
    dm.setup()
    x = dm.load_part("all")["images"]
    assert x.shape == (DIGITS_COUNT, 1, 16, 16) and x.max() == 255 and x.min() == 0
    assert abs(int(x[0].sum()) / 19604 - 1) < 0.01  # record 0, a "0"
    assert abs((x > 127).float().mean().item() - 0.30) < 0.05
    # a "0" is a ring: its centre is darker than the ring around it
    assert x[0, 0, 6:10, 6:10].float().mean() < x[0, 0, 2:14, 2:14].float().mean()


def test_batches_dtype_range_shape(cache):
    dm = _digits(cache, batch_size=64)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert (
        x.shape == (64, 1, 16, 16)
        and x.dtype == torch.float32
        and y.shape == (64,)
        and y.dtype == torch.int64
    )
    assert x.min() == -1 and x.max() == 1
    batches = list(dm.train_dataloader())
    assert all(len(b[0]) == 64 for b in batches)  # drop_last on the training loader
    val = list(dm.val_dataloader())
    assert sum(len(b[1]) for b in val) == len(dm.dataset("val")) == round(0.05 * DIGITS_COUNT)


def test_seeded_split_is_deterministic_and_disjoint(cache):
    a, b, c = _digits(cache, seed=3), _digits(cache, seed=3), _digits(cache, seed=4)
    va, vb, vc = (dm.real_images("val") for dm in (a, b, c))
    assert torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1])
    assert not torch.equal(va[1], vc[1]) or not torch.equal(va[0], vc[0])
    _, train = a._subset("train")
    _, val = a._subset("val")
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == DIGITS_COUNT
    # digits have no test file: the test set is the held-out slice
    assert torch.equal(a.real_images("test")[0], va[0])
    s1, s2 = a.real_images("train", n=100), b.real_images("train", n=100)
    assert len(s1[0]) == 100 and torch.equal(s1[0], s2[0])


def test_balance_classes_reaches_the_training_batches(cache):
    plain, balanced = _digits(cache), _digits(cache, balance_classes=True)
    for dm in (plain, balanced):
        dm.setup("fit")
    assert plain.train_dataloader().by_class is None
    batches = balanced.train_dataloader()
    train_labels = balanced.real_images("train")[1]
    assert batches.epoch_size == 10 * int(torch.bincount(train_labels).max())
    drawn = torch.bincount(torch.cat([y for _, y in batches]), minlength=10)
    # whole batches of an epoch of 10 equal classes: each class within one batch of its equal share
    assert drawn.max() - drawn.min() <= balanced.batch_size
    assert int(drawn.min()) > 0.9 * int(torch.bincount(train_labels).max())
    # the validation set keeps the data's own class shares
    assert torch.equal(balanced.real_images("val")[1], plain.real_images("val")[1])


def test_hflip_flips_about_half():
    images = torch.arange(4 * 4, dtype=torch.uint8).view(1, 1, 4, 4).repeat(400, 1, 1, 1)
    ds = TensorBatches(images, torch.zeros(400, dtype=torch.int64), torch.arange(400), hflip=True)
    torch.manual_seed(0)
    x, _ = ds.__getitems__(list(range(400)))
    plain = images[:1].float() / 127.5 - 1
    flipped = (x == plain.flip(-1)).flatten(1).all(1)
    same = (x == plain).flatten(1).all(1)
    assert (flipped | same).all() and 150 < int(flipped.sum()) < 250
    assert not TensorBatches(images, images.new_zeros(400).long(), torch.arange(400)).hflip


def test_bad_settings_are_refused(cache):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        DiffusionDataModule(name="imagenet")
    with pytest.raises(ValueError, match="split must be one of"):
        _digits(cache, split="train")
    with pytest.raises(ValueError, match="unknown setting"):
        _digits(cache, box_fraction=0.5)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        _digits(cache, channels=2)
    with pytest.raises(ValueError, match="val_fraction"):
        _digits(cache, val_fraction=1.0)
    dm = _digits(cache, num_classes=5)
    with pytest.raises(ValueError, match="labels reach 9 but num_classes is 5"):
        dm.setup()
    with pytest.raises(ValueError, match="no separate test file"):
        _digits(cache, val_fraction=0).test_dataloader()


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=["+paths=default", f"+dataset={name}", *overrides])


@pytest.mark.parametrize(
    "name, size, channels, hflip",
    [
        ("digits", 16, 1, False),
        ("mnist", 28, 1, False),
        ("persian", 32, 1, False),
        ("folder", 32, 3, False),
        ("cifar10", 32, 3, True),
    ],
)
def test_every_config_instantiates(name, size, channels, hflip, tmp_path):
    cfg = _compose(name, f"dataset.cache_dir={tmp_path}")
    dm = instantiate(cfg.dataset)
    assert isinstance(dm, DiffusionDataModule)
    assert (dm.name, dm.image_size, dm.channels, dm.hflip) == (name, size, channels, hflip)
    assert dm.balance_classes is False
    balanced = _compose(name, f"dataset.cache_dir={tmp_path}", "dataset.balance_classes=true")
    assert instantiate(balanced.dataset).balance_classes
    if name != "folder":
        assert dm.num_classes == 10


def test_cifar10_offline_missing_message(tmp_path):
    cfg = _compose("cifar10", f"dataset.root={tmp_path / 'cifar'}", "dataset.download=false")
    dm = instantiate(cfg.dataset)
    with pytest.raises(MissingDataError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "'cifar10'" in msg and "cifar-10-batches-py/data_batch_1" in msg and str(tmp_path / "cifar") in msg
    assert "dataset.download=true" in msg and "\n" not in msg


class _Probe(L.LightningModule):
    """Records the batches Lightning hands to training_step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.shape, x.dtype, float(x.min()), float(x.max()), y.dtype))
        return (self.w * x.mean()).sum() + self.w.square().sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_consumes_the_datamodule(cache, tmp_path):
    dm = _digits(cache, batch_size=32)
    probe = _Probe()
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(probe, datamodule=dm)
    assert len(probe.seen) == 3
    assert all(s[0] == (32, 1, 16, 16) and s[1] == torch.float32 and s[4] == torch.int64 for s in probe.seen)
    assert all(-1 <= s[2] and s[3] <= 1 for s in probe.seen)


def test_preview_writes_a_grid(tmp_path, cache):
    from diffusion_lab.api import compose_config
    from diffusion_lab.data.preview import run

    overrides = ["dataset=digits", f"dataset.cache_dir={cache}", f"out={tmp_path / 'grid.png'}", "scale=1"]
    out = run(compose_config("preview", overrides))
    img = Image.open(out)
    assert img.size == (10 * 18 + 2, 10 * 18 + 2)  # 10 x 10 images of 16 px with 2 px padding
