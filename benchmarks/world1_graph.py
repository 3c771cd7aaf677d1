"""Prints the FX graph dynamo traces for one VideoDiT block at world 1 (forward), from the
checkout whose ``plugin/`` is on PYTHONPATH: diff two checkouts' outputs to show a change
leaves the compiled world-1 block alone.

    PYTHONPATH=OLD/plugin python benchmarks/world1_graph.py OLD/tests > before.txt
    PYTHONPATH=NEW/plugin python benchmarks/world1_graph.py NEW/tests > after.txt
"""

import sys

import torch
from torch._dynamo.testing import EagerAndRecordGraphs

sys.path.insert(0, sys.argv[1])  # the tests folder of that checkout
from test_dit import SIZES
from vidpar.nn import DiTConfig
from vidpar.nn.dit_blocks import DiTBlock
from vidpar.nn.regional_compile import block_runner

graphs = EagerAndRecordGraphs()
run = block_runner({"backend": graphs}, False)
config = DiTConfig(**SIZES)
torch.manual_seed(0)
x = torch.randn(2, 12, config.hidden_size, requires_grad=True)
time = torch.randn(2, 6, config.hidden_size)
context = torch.randn(2, 3, config.hidden_size)
angles = torch.zeros(12, config.head_dim // 2)
rope = (angles.cos().repeat_interleave(2, -1)[:, None], angles[:, None].repeat(1, 1, 2))
out = run(DiTBlock(config), x, time, context, rope, 12)
out.sum().backward()
print(len(graphs.graphs))
print(graphs.graphs[0].code)
