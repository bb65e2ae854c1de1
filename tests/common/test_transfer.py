"""Free transfer inputs: made from the public inputs alone, as many as asked, seeded."""

import torch

from common.transfer import augmented_images, spliced_tokens


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_augmented_images_are_new_images_in_range_made_from_the_public_ones():
    public = torch.rand(5, 1, 8, 8)
    made = augmented_images(public, 40, _generator())
    assert made.shape == (40, 1, 8, 8) and made.min() >= 0 and made.max() <= 1
    assert not any(torch.equal(m, p) for m in made for p in public)
    assert torch.equal(made, augmented_images(public, 40, _generator()))  # seeded
    assert not torch.equal(made, augmented_images(public, 40, _generator(1)))
    blank = augmented_images(torch.zeros(3, 1, 8, 8), 10, _generator())
    assert blank.abs().max() == 0  # nothing but what the public images hold


def test_spliced_sequences_hold_only_public_tokens_start_as_a_public_one_and_keep_the_padding_right():
    pad = 0
    public = torch.tensor([[101, 5, 6, 7, 8, 102, 0, 0], [101, 9, 10, 11, 102, 0, 0, 0], [101, 12, 13, 102, 0, 0, 0, 0]])
    made = spliced_tokens(public, 300, pad, _generator())
    assert made.shape == (300, 8)
    assert set(made.unique().tolist()) <= set(public.unique().tolist())
    assert (made[:, 0] == 101).all()
    lengths = (made != pad).sum(1)
    assert all((row[:n] != pad).all() and (row[n:] == pad).all() for row, n in zip(made, lengths))
    assert len({tuple(r.tolist()) for r in made}) > len(public)  # new sequences
    assert torch.equal(made, spliced_tokens(public, 300, pad, _generator()))
