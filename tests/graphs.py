"""Small graphs shared by the tape's tests (tests/test_tape.py and the rules' graph tests): each exercises one kind of
junction of docs/maths.md §7.1 at a size that runs in milliseconds in float64."""
import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """A BasicBlock (conv-BN-ReLU-conv-BN, ``out += identity`` in place, ReLU), a downsampling block with a 1×1
    shortcut, average pooling, a head. ``spread_bn``: BatchNorm's γ, β drawn away from their 1, 0 defaults (which
    would hide their parts of a rule)."""

    def __init__(self, classes: int = 5, down_bias: bool = True, spread_bn: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=down_bias), nn.BatchNorm2d(6))
        self.conv3 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, classes)
        if spread_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    with torch.no_grad():
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(h))
        out += h
        h = F.relu(out)
        h = F.relu(self.conv3(h) + self.down(h))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class DenseGate(nn.Module):
    """DenseNet-style concatenations, a squeeze-excitation gate (a product of two values), a layer scale (a bare
    parameter times a value), chunk."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(10, 4)
        self.gate = nn.Linear(14, 14)
        self.gamma = nn.Parameter(torch.rand(14) + 0.5)
        self.head = nn.Linear(7, classes)

    def forward(self, x):
        h = torch.cat([x, torch.tanh(self.a(x))], dim=1)
        h = torch.cat([h, F.gelu(self.b(h))], 1)
        h = h * torch.sigmoid(self.gate(h)) * self.gamma
        left, right = h.chunk(2, dim=1)
        return self.head(left - right / 2)


class AttentionBlock(nn.Module):
    """A ViT-style block: a class token and position embedding (bare parameters), pre-LayerNorm, SDPA with heads, a
    residual, a GELU MLP, the class token's output."""

    def __init__(self, dim: int = 8, heads: int = 2, tokens: int = 5, classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.1)
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.mlp1, self.mlp2 = nn.LayerNorm(dim), nn.Linear(dim, 16), nn.Linear(16, dim)
        self.head, self.heads = nn.Linear(dim, classes), heads

    def forward(self, x):
        b, t, _ = x.shape
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(x)], dim=1) + self.pos
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        split = lambda z: z.reshape(b, t + 1, self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v))
        h = h + self.proj(a.transpose(1, 2).reshape(b, t + 1, -1))
        h = h + self.mlp2(F.gelu(self.mlp1(self.norm2(h))))
        return self.head(h[:, 0])


class TinyLM(nn.Module):
    """A decoder-only language model in plain torch: token embedding tied to the head, learned positions,
    pre-LayerNorm blocks with causal SDPA and a GELU MLP, residuals."""

    def __init__(self, vocab: int = 11, dim: int = 8, context: int = 6, blocks: int = 2):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Parameter(torch.randn(context, dim) * 0.1)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(n1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim),
                               n2=nn.LayerNorm(dim), up=nn.Linear(dim, 4 * dim), down=nn.Linear(4 * dim, dim)))
            for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids):
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        for block in self.blocks:
            q, k, v = block["qkv"](block["n1"](h)).chunk(3, dim=-1)
            h = h + block["proj"](F.scaled_dot_product_attention(q, k, v, is_causal=True))
            h = h + block["down"](F.gelu(block["up"](block["n2"](h))))
        return F.linear(self.norm(h), self.tokens.weight).flatten(0, 1)  # tied head: (B·T, vocab)
