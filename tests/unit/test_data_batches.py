"""ResumableBatches: seeded order, disjoint rank shards, resume at the first unconsumed batch."""

import torch

from diffusion_lab.data.batches import ResumableBatches
from diffusion_lab.data.datamodule import TensorBatches


def _dataset(n=100, hflip=False):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return TensorBatches(images, torch.arange(n), torch.arange(n), hflip=hflip)


def _ids(batch):
    return ((batch[0][:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def test_order_is_seeded_and_covers_each_epoch():
    a, b = ResumableBatches(_dataset(), 10, seed=3), ResumableBatches(_dataset(), 10, seed=3)
    ea = [i for batch in a for i in _ids(batch)]
    eb = [i for batch in b for i in _ids(batch)]
    assert ea == eb and sorted(ea) == list(range(100))
    c = ResumableBatches(_dataset(), 10, seed=4)
    assert [i for batch in c for i in _ids(batch)] != ea


def test_rank_shards_are_disjoint_and_equal():
    shards = [ResumableBatches(_dataset(101), 10, seed=0, rank=r, world_size=2) for r in range(2)]
    ids = [[i for batch in s for i in _ids(batch)] for s in shards]
    assert len(ids[0]) == len(ids[1]) == 50
    assert not set(ids[0]) & set(ids[1])


def test_resume_starts_at_first_unconsumed_batch():
    full = ResumableBatches(_dataset(), 10, seed=1)
    batches = []
    for _ in range(2):  # two epochs, consuming every batch
        for batch in full:
            batches.append(_ids(batch))
            full.mark_consumed()
    run = ResumableBatches(_dataset(), 10, seed=1)
    it = iter(run)
    for _ in range(7):
        next(it)
        run.mark_consumed()
    next(it)  # prefetched, never trained on: must come again after resume
    state = run.state_dict()
    resumed = ResumableBatches(_dataset(), 10, seed=1)
    resumed.load_state_dict(state)
    got = []
    for _ in range(2):
        for batch in resumed:
            got.append(_ids(batch))
            resumed.mark_consumed()
            if len(got) == 13:
                break
        if len(got) == 13:
            break
    assert got == batches[7:20]


def test_flips_are_reproducible():
    images = torch.tensor([[0, 255]], dtype=torch.uint8).expand(40, 1, 1, 2).contiguous()  # asymmetric

    def run():
        ds = TensorBatches(images, torch.zeros(40, dtype=torch.long), torch.arange(40), hflip=True)
        return torch.cat([b[0] for b in ResumableBatches(ds, 8, seed=2)])

    a, b = run(), run()
    assert torch.equal(a, b)
    flipped = (a[:, 0, 0, 0] > 0).float().mean().item()
    assert 0.2 < flipped < 0.8, "about half the images are flipped"


def _skewed():
    """Subset rows 100..199 of a 200-image part: 10 of class 0, 25 of class 1, 65 of class 2 (shuffled)."""
    n = 200
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.full((n,), 9)  # rows outside the subset carry a class that must never be drawn
    rows = torch.arange(100, 200)
    classes = torch.tensor([0] * 10 + [1] * 25 + [2] * 65)
    labels[rows] = classes[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    return TensorBatches(images, labels, rows)


def test_balanced_epoch_draws_every_class_equally_and_every_image():
    ds = _skewed()
    batches = ResumableBatches(ds, 13, seed=5, balance_classes=True)
    assert batches.epoch_size == 3 * 65 and len(batches) == 15
    drawn = torch.cat([b[1] for b in batches])
    assert torch.bincount(drawn).tolist() == [65, 65, 65]
    positions = batches.draws(0)
    assert len(positions) == 195
    per_image = torch.bincount(positions, minlength=100)
    label = ds.labels[ds.index]
    # 65 draws per class: class 0's 10 images 6 or 7 times each, class 1's 25 twice or three times, class 2's
    # 65 once; every image seen, none dropped, repeats as even as the sizes allow
    for c, (lo, hi) in enumerate([(6, 7), (2, 3), (1, 1)]):
        counts = per_image[label == c]
        assert counts.sum() == 65 and counts.min() >= lo and counts.max() <= hi
    assert torch.equal(positions, ResumableBatches(ds, 13, seed=5, balance_classes=True).draws(0))
    # which images get the extra repeat is drawn afresh each epoch
    extra = [
        frozenset((torch.bincount(batches.draws(e), minlength=100) == 7).nonzero()[:, 0].tolist())
        for e in range(4)
    ]
    assert len(set(extra)) > 1
    assert not torch.equal(positions, batches.draws(1))
    shards = [ResumableBatches(ds, 13, seed=5, rank=r, world_size=2, balance_classes=True) for r in range(2)]
    assert [len(s) for s in shards] == [7, 7]
    for r, shard in enumerate(shards):  # rank r: every 2nd draw from r, cut to 7 whole batches of 13
        assert torch.equal(shard.order(0), positions[r::2][: 7 * 13])


def test_unbalanced_order_is_the_seeded_permutation():
    ds = _skewed()
    plain = ResumableBatches(ds, 10, seed=5)
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(5 * 1_000_003 + 2))
    assert torch.equal(plain.order(2), expected)
    drawn = torch.cat([b[1] for b in plain])
    assert torch.bincount(drawn).tolist() == [10, 25, 65]
