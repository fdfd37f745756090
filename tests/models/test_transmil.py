"""TransMIL internals: pseudo-inverse, Nyström attention, landmarks, grid layout, PPEG."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oncoslide.models import create_model
from oncoslide.models.transmil import (
    PPEG,
    MaskedNystromAttention,
    _GridLayout,
    _landmark_segments,
    iterative_pinv,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _sharp_softmax(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(3.0 * torch.randn(n, n, generator=gen, dtype=torch.float64), dim=-1)


def test_iterative_pinv_matches_linalg_pinv() -> None:
    matrices = torch.stack([_sharp_softmax(9, s) for s in range(4)])
    valid = torch.ones(4, 9, dtype=torch.bool)
    z = iterative_pinv(matrices, valid, valid, iters=40)
    torch.testing.assert_close(z, torch.linalg.pinv(matrices), atol=1e-8, rtol=1e-6)


def test_identity_padding_leaves_the_valid_block_of_the_pinv_unchanged() -> None:
    small = _sharp_softmax(5, 0)
    padded = torch.eye(8, dtype=torch.float64)
    padded[:5, :5] = small
    valid = torch.arange(8) < 5
    z_small = iterative_pinv(small[None], torch.ones(1, 5, dtype=torch.bool), valid[None, :5], 6)
    z_padded = iterative_pinv(padded[None], valid[None], valid[None], 6)
    torch.testing.assert_close(z_padded[0, :5, :5], z_small[0], atol=1e-12, rtol=0)
    assert (z_padded[0, :5, 5:] == 0).all() and (z_padded[0, 5:, :5] == 0).all()


def test_nystrom_with_every_token_a_landmark_is_exact_softmax_attention() -> None:
    torch.manual_seed(0)
    length, dim, heads = 12, 16, 2
    attention = MaskedNystromAttention(
        dim, heads=heads, n_landmarks=64, pinv_iterations=40, residual_kernel=0, dropout=0.0
    ).double()
    with torch.no_grad():
        attention.to_qkv.weight.mul_(3.0)  # sharp attention: a well-conditioned kernel
    x = torch.randn(1, length, dim, dtype=torch.float64)
    out, cls_attention = attention(x, torch.ones(1, length, dtype=torch.bool), True)
    q, k, v = attention.to_qkv(x).reshape(1, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
    exact = attention.to_out((probs @ v).transpose(1, 2).reshape(1, length, dim))
    # the forward pass takes the exact path for a bag this small ...
    torch.testing.assert_close(out, exact, atol=1e-8, rtol=1e-6)
    # ... and the Nystrom path itself agrees when every token is a landmark
    mask = torch.ones(1, length, dtype=torch.bool)
    nystrom = attention._nystrom(q * (dim // heads) ** -0.5, k, v, mask)
    torch.testing.assert_close(nystrom, probs @ v, atol=1e-8, rtol=1e-6)
    assert cls_attention is not None
    torch.testing.assert_close(cls_attention, probs[:, :, 0].mean(dim=1))


def test_landmark_segments_are_contiguous_near_equal_and_skip_padding() -> None:
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, :3] = True
    mask[2, :] = True
    segment, landmark_mask, m_max = _landmark_segments(mask, n_landmarks=4)
    assert m_max == 4
    assert segment[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert segment[1].tolist() == [0, 1, 2] + [4] * 9  # 3 tokens: 3 landmarks
    assert segment[2].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert landmark_mask.tolist() == [[True] * 4, [True, True, True, False], [True] * 4]


def test_grid_layout_fills_each_bag_row_by_row_with_repeats() -> None:
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :5] = True  # side 3: 9 cells, 4 repeats
    mask[1, :2] = True  # side 2: 4 cells, 2 repeats
    layout = _GridLayout(mask)
    assert layout.side_max == 3
    assert layout.patch_of_cell[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert layout.cell_valid[1].tolist() == [True] * 4 + [False] * 5
    assert layout.seq_mask.shape == (2, 10)

    rows = torch.arange(7.0)[:, None].expand(7, 2)  # packed: bag 0 = 0..4, bag 1 = 5, 6
    cells = layout.tokens(rows)
    assert cells[0, :, 0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert cells[1, :, 0].tolist() == [5, 6, 5, 6, 0, 0, 0, 0, 0]
    canvas = layout.to_canvas(cells + 1)  # +1 so that a zero means "outside the grid"
    assert canvas[0, 0].tolist() == [[1, 2, 3], [4, 5, 1], [2, 3, 4]]
    assert canvas[1, 0].tolist() == [[6, 7, 0], [6, 7, 0], [0, 0, 0]]
    torch.testing.assert_close(
        layout.from_canvas(canvas), torch.where(layout.cell_valid[..., None], cells + 1, 0)
    )


def test_ppeg_on_the_canvas_equals_ppeg_on_the_lone_grid() -> None:
    torch.manual_seed(0)
    ppeg = PPEG(4)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, :30] = True  # side 6
    mask[1, :7] = True  # side 3
    layout = _GridLayout(mask)
    rows = torch.randn(37, 4)
    out = layout.from_canvas(ppeg(layout.to_canvas(layout.tokens(rows))))
    lone_grid = layout.tokens(rows)[1, :9].T.reshape(1, 4, 3, 3)
    expected = lone_grid + sum(
        F.conv2d(lone_grid, conv.weight, conv.bias, padding=conv.padding, groups=4)
        for conv in ppeg.convs
    )
    torch.testing.assert_close(out[1, :9], expected.reshape(4, 9).T)


@pytest.mark.parametrize("n_landmarks", [2, 7, 256])
def test_transmil_is_padding_invariant_for_any_landmark_count(n_landmarks: int) -> None:
    torch.manual_seed(0)
    model = create_model(
        "transmil", in_dim=6, n_outputs=2, hidden_dim=16, heads=2, n_landmarks=n_landmarks
    ).eval()
    lengths = (50, 2, 17)
    features = torch.randn(3, 60, 6)
    mask = torch.arange(60)[None] < torch.tensor(lengths)[:, None]
    batched = model(features, mask)
    for b, n in enumerate(lengths):
        alone = model(features[b : b + 1, :n], mask[b : b + 1, :n])
        torch.testing.assert_close(alone.logits[0], batched.logits[b], atol=1e-5, rtol=0)


def planted_bags(
    n_bags: int, n_patches: int, dim: int, strength: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of noise; odd bags are positive and get one 'key' patch shifted along axis 0."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_bags, n_patches, dim, generator=gen)
    labels = torch.arange(n_bags) % 2
    key = torch.randint(0, n_patches, (n_bags,), generator=gen)
    positive = labels == 1
    features[positive, key[positive]] += strength * torch.eye(dim)[0]
    return features, labels


def test_transmil_learns_a_planted_key_patch() -> None:
    """Planted ground truth, judged on held-out bags (memorising the training bags fails)."""
    features, labels = planted_bags(64, 10, 6, strength=8.0, seed=5)
    test_features, test_labels = planted_bags(64, 10, 6, strength=8.0, seed=6)
    mask = torch.ones(64, 10, dtype=torch.bool)
    torch.manual_seed(0)
    model = create_model(
        "transmil", in_dim=6, n_outputs=2, hidden_dim=16, heads=2, n_landmarks=4, dropout=0.0
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimiser.zero_grad()
        F.cross_entropy(model(features, mask).logits, labels).backward()
        optimiser.step()
    with torch.no_grad():
        predicted = model.eval()(test_features, mask).logits.argmax(dim=1)
    assert (predicted == test_labels).float().mean() >= 0.8  # chance: 0.5
