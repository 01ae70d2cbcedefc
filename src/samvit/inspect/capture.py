"""Attention capture outside the model: the encoder is walked block by block, and each block's attention
probabilities are recomputed from its own weights, chunk by chunk, and handed to reducers.

The normal forward path is not touched: every block still runs its own `forward` to produce the next block's
input, so the captured maps belong to exactly the activations the encoder computes. Maps are computed in
float32 (whatever the weights' dtype) with the official arithmetic: `(q * scale) @ k^T + rel_h + rel_w`, softmax.

Geometry. A block attends within "windows": the whole (H, W) token grid for a global block, or ws x ws windows of
the grid zero-padded bottom/right to a multiple of ws (after norm1, as the official code pads). A padded slot is
never a query here; as a key it holds probability mass in the official arithmetic (its key is the qkv bias), so
the captured rows keep it: every row sums to 1 over all the keys of its window, real and padded, which are the
keys the model attends to. `BlockAttention.grid_map(i)` places the real keys on the image grid and
`BlockAttention.padding_mass()` holds the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..modeling.kernels import AttnInputs, attention_logits
from ..modeling.encoder import ImageEncoder
from ..errors import ParameterError

# Score entries (windows x heads x queries x keys, float32) per chunk: 64 MiB (one head of a 64x64 global block).
# Each chunk takes about eight tensor operations (bias, scores, log-softmax, exp, the reducers' row sums), and three
# such tensors live at once (192 MiB, under a tenth of ViT-H's weights). Smaller chunks fit the cache better but pay
# each operation's fixed cost more often: on the shared 2-core build machine, a ViT-B global block took 2.5x longer
# to capture with 2^20 than with 2^22, and 2^24 was faster again.
CHUNK_ELEMS = 1 << 24
MAX_KEPT_BYTES = 2 << 30  # attention() refuses to keep more maps than this

Token = Tuple[int, int]


@dataclass
class Chunk:
    """One chunk of one block's attention: all keys of `windows` for the local queries q0:q1."""

    block: int
    window_size: int  # 0 for a global block
    win_shape: Tuple[int, int]  # (rows, cols) of tokens per window: (ws, ws), or the grid for a global block
    grid: Tuple[int, int]  # (H, W) of the real token grid
    n_win_cols: int  # windows per grid row
    windows: Tuple[int, int]  # window indices w0:w1 (row-major over the window grid)
    queries: Tuple[int, int]  # local query indices q0:q1 (row-major in the window)
    heads: Tuple[int, int]  # heads h0:h1
    log_probs: torch.Tensor  # (windows, heads, queries, keys) log-softmax of the scores over the keys, float32
    probs: torch.Tensor  # its exp: the attention probabilities

    def window_origin(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-left grid token (row, col) of windows w."""
        if self.window_size == 0:
            return torch.zeros_like(w), torch.zeros_like(w)
        return (w // self.n_win_cols) * self.window_size, (w % self.n_win_cols) * self.window_size

    def local_rc(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Local (row, col) of window-local token indices."""
        return idx // self.win_shape[1], idx % self.win_shape[1]

    def query_mask(self, image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(windows, queries) bool: the query is a real grid token (and, given a (H, W) mask, an image token)."""
        return self._real(torch.arange(*self.queries), image_tokens)

    def key_mask(self) -> torch.Tensor:
        """(windows, keys) bool: the key is a real grid token, not window padding."""
        return self._real(torch.arange(self.win_shape[0] * self.win_shape[1]), None)

    def _real(self, idx: torch.Tensor, image_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        r0, c0 = self.window_origin(torch.arange(*self.windows))
        lr, lc = self.local_rc(idx)
        r, c = r0[:, None] + lr[None, :], c0[:, None] + lc[None, :]
        real = (r < self.grid[0]) & (c < self.grid[1])
        if image_tokens is not None:
            real &= image_tokens.to(torch.bool)[r.clamp(max=self.grid[0] - 1), c.clamp(max=self.grid[1] - 1)]
        return real

    def distances(self, patch_size: int) -> torch.Tensor:
        """(queries, keys) distance in pixels between patch centres (the same for every window)."""
        qr, qc = self.local_rc(torch.arange(*self.queries))
        kr, kc = self.local_rc(torch.arange(self.win_shape[0] * self.win_shape[1]))
        d2 = (qr[:, None] - kr[None, :]) ** 2 + (qc[:, None] - kc[None, :]) ** 2
        return patch_size * d2.float().sqrt()


def block_chunks(encoder: ImageEncoder, index: int, x: torch.Tensor,
                 chunk_elems: int = CHUNK_ELEMS) -> Iterator[Chunk]:
    """The attention probabilities of block `index` for the residual stream x (1,H,W,C), chunk by chunk: windows,
    then query rows, then heads, at most about chunk_elems scores each (more only when one query row is larger).
    The record is the one the block's kernel takes (Attention.inputs: windows padded with the qkv bias, the
    relative-position terms), in float32; the scores are modeling.kernels.attention_logits of each chunk."""
    blk = encoder.blocks[index]
    attn = blk.attn
    if x.shape[0] != 1:
        raise ParameterError(f"attention capture takes one image at a time, got a batch of {x.shape[0]}")
    _, H, W, C = x.shape
    ws = blk.window_size
    nh, hd = attn.num_heads, attn.head_dim
    y = blk.norm1(x.float() if x.dtype != torch.float64 else x)  # LayerNorm in float32 (or wider)
    qkv = attn.qkv(y.to(attn.qkv.weight.dtype)).float()
    inp = attn.inputs(qkv)  # q, k, v (windows*heads, n, hd), rel_h / rel_w (windows*heads, n, Hk | Wk)
    win_shape = inp.key_hw
    n_win_cols = -(-W // ws) if ws > 0 else 1
    n = win_shape[0] * win_shape[1]
    q, k = (t.view(-1, nh, n, hd) for t in (inp.q, inp.k))
    n_win = q.shape[0]
    rel_h = None if inp.rel_h is None else inp.rel_h.view(n_win, nh, n, -1)
    rel_w = None if inp.rel_w is None else inp.rel_w.view(n_win, nh, n, -1)
    if nh * n * n <= chunk_elems:
        w_step, q_step, h_step = max(1, chunk_elems // (nh * n * n)), n, nh
    elif n * n <= chunk_elems:
        w_step, q_step, h_step = 1, n, max(1, chunk_elems // (n * n))
    else:
        w_step, q_step, h_step = 1, max(1, chunk_elems // n), 1
    for w0 in range(0, n_win, w_step):
        w1 = min(n_win, w0 + w_step)
        for q0 in range(0, n, q_step):
            q1 = min(n, q0 + q_step)
            for h0 in range(0, nh, h_step):
                h1 = min(nh, h0 + h_step)
                shape = (w1 - w0, h1 - h0, q1 - q0, n)
                kc = k[w0:w1, h0:h1].reshape(-1, n, hd)
                rh, rw = ((None if t is None else t[w0:w1, h0:h1, q0:q1].flatten(0, 1)) for t in (rel_h, rel_w))
                part = AttnInputs(q[w0:w1, h0:h1, q0:q1].reshape(-1, q1 - q0, hd), kc, kc, rh, rw, win_shape,
                                  attn.scale)
                log_probs = torch.log_softmax(attention_logits(part), dim=-1).view(shape)
                del part  # at most three chunk-sized tensors at once: scores, log_probs, probs
                chunk = Chunk(index, ws, win_shape, (H, W), n_win_cols, (w0, w1), (q0, q1), (h0, h1), log_probs,
                              log_probs.exp())
                del log_probs
                yield chunk
                del chunk  # the next chunk's tensors are built after this one's are freed


def require_vit(encoder) -> None:
    """ParameterError unless `encoder` is a ViT ImageEncoder: the capture walks its attention blocks (TinyViT's
    stages are another architecture)."""
    if not isinstance(encoder, ImageEncoder):
        name = getattr(getattr(encoder, "config", None), "name", type(encoder).__name__)
        raise ParameterError(f"samvit.inspect reads a ViT encoder's attention blocks; model {name!r} "
                             f"({type(encoder).__name__}) has none: use a ViT checkpoint (vit_b, vit_l, vit_h, ...)")


@torch.no_grad()
def walk(encoder: ImageEncoder, image: torch.Tensor, blocks: Iterable[int],
         reducers: Sequence[Callable[[Chunk], None]], chunk_elems: int = CHUNK_ELEMS,
         progress: Optional[Callable[[int], None]] = None, full: bool = True) -> torch.Tensor:
    """Run the encoder on one normalised image (1,3,S,S), feeding every chunk of the chosen blocks' attention to
    each reducer; returns the residual stream after the last block run: the pre-neck features (1,H,W,C) computed
    by the encoder's own path (ImageEncoder.iter_blocks, as forward_features) when `full`, else the stream after
    the last chosen block."""
    require_vit(encoder)
    wanted = set(blocks)
    last = max(wanted) if wanted else -1
    x = None
    for i, x in encoder.iter_blocks(image.to(device=encoder.device)):
        if i > 0 and progress is not None:
            progress(i - 1)
        if not full and last >= 0 and i - 1 == last:
            break
        if i in wanted:
            for chunk in block_chunks(encoder, i, x, chunk_elems):
                for reduce in reducers:
                    reduce(chunk)
                del chunk
    return x


# ---------------------------------------------------------------- images in, and where the image lies on the grid


@dataclass
class Prepared:
    """A normalised image (1,3,S,S), the part of the S x S canvas its pixels cover, and the decoded RGB."""

    tensor: torch.Tensor
    input_size: Tuple[int, int]  # (h, w) of the resized image on the canvas (top-left)
    original_size: Tuple[int, int]  # (h, w) of the decoded image
    rgb: Optional[np.ndarray] = None  # (h, w, 3) uint8 decoded image, for pictures (None for a tensor input)

    def image_tokens(self, patch_size: int) -> torch.Tensor:
        """(H, W) bool: the token's patch holds at least one image pixel (False: only canvas padding)."""
        S_h, S_w = self.tensor.shape[-2:]
        H, W = S_h // patch_size, S_w // patch_size
        rows = torch.arange(H) * patch_size < self.input_size[0]
        cols = torch.arange(W) * patch_size < self.input_size[1]
        return rows[:, None] & cols[None, :]


def prepare(image, img_size: int) -> Prepared:
    """A path, PIL image or HxWx3 array -> Prepared (the official preprocessing); a samvit.PreparedImage as it is;
    a tensor (3,S,S) or (1,3,S,S) is taken as already normalised and padded, all of it image."""
    from .. import PreparedImage, load_image, preprocess

    if isinstance(image, Prepared):
        return image
    if isinstance(image, PreparedImage):
        return Prepared(image.tensor[None], tuple(image.input_size), tuple(image.original_size))
    if isinstance(image, torch.Tensor):
        t = image[None] if image.ndim == 3 else image
        if t.ndim != 4 or t.shape[0] != 1:
            raise ParameterError(f"image tensor: expected (3,S,S) or (1,3,S,S), got shape {tuple(image.shape)}")
        return Prepared(t, tuple(t.shape[-2:]), tuple(t.shape[-2:]))
    rgb = load_image(image)
    pi = preprocess(rgb, img_size=img_size)
    return Prepared(pi.tensor[None], tuple(pi.input_size), tuple(pi.original_size), rgb)


def pixel_to_token(x: float, y: float, prepared: Prepared, patch_size: int) -> Token:
    """Grid token (row, col) under pixel (x, y) of the original image."""
    oh, ow = prepared.original_size
    if not (0 <= x < ow and 0 <= y < oh):
        raise ParameterError(f"query pixel ({x:g}, {y:g}) is outside the image of {ow}x{oh} pixels (x < width, "
                             "y < height)")
    sy, sx = prepared.input_size[0] / oh, prepared.input_size[1] / ow
    return int(y * sy // patch_size), int(x * sx // patch_size)


# ---------------------------------------------------------------- reducer (a): the maps of chosen query tokens


@dataclass
class BlockAttention:
    """The attention rows of chosen query tokens in one block: probabilities over the keys of each query's window
    (ws*ws keys for a windowed block, padded slots included; H*W for a global block), heads first."""

    block: int
    window_size: int  # 0 = global
    grid: Tuple[int, int]  # (H, W) tokens
    queries: List[Token]  # grid (row, col) of each query
    probs: torch.Tensor  # (queries, heads, keys)
    origins: List[Token]  # top-left grid token of each query's window ((0, 0) for a global block)

    @property
    def win_shape(self) -> Tuple[int, int]:
        return (self.window_size, self.window_size) if self.window_size else self.grid

    def key_tokens(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grid rows, cols and realness of the keys of query i (padded window slots lie beyond the grid)."""
        n = self.win_shape[0] * self.win_shape[1]
        idx = torch.arange(n)
        r = self.origins[i][0] + idx // self.win_shape[1]
        c = self.origins[i][1] + idx % self.win_shape[1]
        return r, c, (r < self.grid[0]) & (c < self.grid[1])

    def grid_map(self, i: int) -> torch.Tensor:
        """(heads, H, W) probabilities of query i on the token grid; zero outside its window; padding dropped."""
        r, c, real = self.key_tokens(i)
        out = self.probs.new_zeros(self.probs.shape[1], *self.grid)
        out[:, r[real], c[real]] = self.probs[i][:, real]
        return out

    def padding_mass(self) -> torch.Tensor:
        """(queries, heads): the probability each query puts on padded window slots (0 for global blocks)."""
        out = self.probs.new_zeros(self.probs.shape[:2])
        for i in range(len(self.queries)):
            real = self.key_tokens(i)[2]
            out[i] = self.probs[i][:, ~real].sum(-1)
        return out


class QueryMaps:
    """Reducer keeping the full attention rows of the chosen query tokens."""

    def __init__(self, queries: Sequence[Token], grid: Tuple[int, int], num_heads: int) -> None:
        H, W = grid
        for r, c in queries:
            if not (0 <= r < H and 0 <= c < W):
                raise ParameterError(f"query token (row {r}, col {c}) is outside the {H}x{W} token grid")
        self.queries = [(int(r), int(c)) for r, c in queries]
        self.grid = grid
        self.num_heads = num_heads
        self.rows: Dict[int, torch.Tensor] = {}  # block -> (queries, heads, keys)
        self.meta: Dict[int, Tuple[int, List[Token]]] = {}

    def _locate(self, chunk: Chunk, token: Token) -> Tuple[int, int, Token]:
        r, c = token
        if chunk.window_size == 0:
            return 0, r * chunk.grid[1] + c, (0, 0)
        ws = chunk.window_size
        w = (r // ws) * chunk.n_win_cols + c // ws
        return w, (r % ws) * ws + c % ws, ((r // ws) * ws, (c // ws) * ws)

    def __call__(self, chunk: Chunk) -> None:
        n_keys = chunk.probs.shape[-1]
        if chunk.block not in self.rows:
            self.rows[chunk.block] = torch.full((len(self.queries), self.num_heads, n_keys), float("nan"))
            self.meta[chunk.block] = (chunk.window_size, [self._locate(chunk, t)[2] for t in self.queries])
        rows = self.rows[chunk.block]
        (w0, w1), (q0, q1), (h0, h1) = chunk.windows, chunk.queries, chunk.heads
        for i, tok in enumerate(self.queries):
            w, q, _ = self._locate(chunk, tok)
            if w0 <= w < w1 and q0 <= q < q1:
                rows[i, h0:h1] = chunk.probs[w - w0, :, q - q0].cpu()

    def result(self) -> Dict[int, BlockAttention]:
        return {b: BlockAttention(b, self.meta[b][0], self.grid, list(self.queries), rows, self.meta[b][1])
                for b, rows in self.rows.items()}


def _check_blocks(encoder: ImageEncoder, blocks: Union[None, int, Iterable[int]]) -> List[int]:
    """The block indices asked for (all when None), checked against the encoder."""
    require_vit(encoder)
    depth = len(encoder.blocks)
    if blocks is None:
        return list(range(depth))
    if isinstance(blocks, int):
        blocks = [blocks]
    blocks = sorted({int(b) for b in blocks})
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ParameterError(f"block {bad[0]} does not exist: model {encoder.config.name!r} has blocks 0..{depth - 1}")
    return blocks


@dataclass
class AttentionResult:
    """What `attention` returns: per block, the chosen queries' rows; the image's place on the grid."""

    blocks: Dict[int, BlockAttention]
    image_tokens: torch.Tensor  # (H, W) bool: tokens whose patch holds image pixels
    prepared: Prepared


def attention(encoder: ImageEncoder, image, blocks: Union[None, int, Iterable[int]] = None,
              queries: Union[str, Sequence[Token]] = "all", chunk_elems: int = CHUNK_ELEMS) -> AttentionResult:
    """Attention probabilities of the chosen query tokens ((row, col) on the token grid, or "all") in the chosen
    blocks (default all) for one image (path, array, PIL image, PreparedImage, or a normalised tensor).

    "all" keeps heads x N x keys floats per block (1 GiB for a ViT-H global block at 1024): more than
    MAX_KEPT_BYTES in all is refused; choose queries or blocks there.
    """
    blocks = _check_blocks(encoder, blocks)
    prepared = prepare(image, encoder.config.img_size)
    p = encoder.config.patch_size
    grid = (prepared.tensor.shape[-2] // p, prepared.tensor.shape[-1] // p)
    if isinstance(queries, str):
        if queries != "all":
            raise ParameterError(f"queries: expected 'all' or a list of (row, col) tokens, got {queries!r}")
        queries = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    reducer = QueryMaps(queries, grid, encoder.config.num_heads)
    heads, n = encoder.config.num_heads, grid[0] * grid[1]
    kept = sum(4 * len(reducer.queries) * heads * (n if encoder.blocks[b].window_size == 0
                                                   else encoder.blocks[b].window_size ** 2) for b in blocks)
    if kept > MAX_KEPT_BYTES:
        raise ParameterError(f"attention: {len(reducer.queries)} queries in {len(blocks)} blocks would keep "
                             f"{kept / 2**30:.1f} GiB of maps (limit {MAX_KEPT_BYTES / 2**30:.0f} GiB); choose fewer "
                             "queries or blocks, or use attention_distance for statistics over every query")
    walk(encoder, prepared.tensor, blocks, [reducer], chunk_elems, full=False)  # later blocks are not needed
    return AttentionResult(reducer.result(), prepared.image_tokens(p), prepared)
