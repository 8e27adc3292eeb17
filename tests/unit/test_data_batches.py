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
