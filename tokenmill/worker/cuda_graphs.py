"""Replaying captured decode steps: on a GPU a small model's decode step is hundreds of kernel
launches whose launch cost dwarfs the math; a CUDA graph launches them all at once.

A pure-decode step of B requests runs the graph captured for the smallest size S >= B. Rows
B..S-1 are padding: they write their K/V into a scratch block no request owns and attend to it
alone. All inputs live in static buffers, refilled before each replay:

    input_ids, positions, slot_mapping, seq_lens  [S_max]
    query_start_loc                                [S_max + 1]  (0, 1, 2, ...: one query each)
    block_table                                    [S_max, max_blocks]

Only backends whose forward launches kernels without host work can be captured (the Triton
backend); on the CPU `capture=False` runs the same static-buffer path eagerly, which is how the
padding logic is tested without a GPU.
"""

from __future__ import annotations

import logging

import torch

from tokenmill.attention.context import forward_context
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


def graph_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 16, 16))
    return sorted({min(s, max_batch) for s in sizes})


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_blocks: int,
        scratch_block: int,
        max_batch: int,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.sizes = graph_sizes(max_batch)
        device = kv_caches[0].device
        top = self.sizes[-1]
        self.input_ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((top,), scratch_block * block_size, device=device)
        self.seq_lens = torch.ones(top, dtype=torch.long, device=device)
        self.num_computed = torch.zeros(top, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.long, device=device)
        self.block_table = torch.full((top, max_blocks), scratch_block, device=device)
        self.max_blocks = max_blocks
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def can_run(self, inputs: StepInputs) -> bool:
        md = inputs.metadata
        return (
            md.num_tokens == md.num_reqs
            and md.num_reqs <= self.sizes[-1]
            and md.block_table.shape[1] <= self.max_blocks
        )

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [B, E] of a pure-decode step."""
        md = inputs.metadata
        num = md.num_reqs
        size = next(s for s in self.sizes if s >= num)
        self._fill(inputs, num, size)
        graph = self._graphs.get(size)
        if graph is None:  # eager over the same buffers (CPU tests, or capture disabled)
            return self._forward(size)[:num]
        graph.replay()
        return self._outputs[size][:num]

    def _fill(self, inputs: StepInputs, num: int, size: int) -> None:
        md = inputs.metadata
        self.input_ids[:num].copy_(inputs.input_ids)
        self.positions[:num].copy_(inputs.positions)
        self.slot_mapping[:num].copy_(md.slot_mapping)
        self.seq_lens[:num].copy_(md.seq_lens)
        self.num_computed[:num].copy_(md.num_computed)
        width = md.block_table.shape[1]
        self.block_table[:num, :width].copy_(md.block_table)
        # Padding rows: position 0, one key, all in the scratch block.
        self.input_ids[num:size].zero_()
        self.positions[num:size].zero_()
        self.slot_mapping[num:size].fill_(self.scratch_block * self.block_size)
        self.seq_lens[num:size].fill_(1)
        self.num_computed[num:size].zero_()
        self.block_table[num:size].fill_(self.scratch_block)

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_tokens=size,
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            num_computed=self.num_computed[:size],
            block_table=self.block_table[:size],
            slot_mapping=self.slot_mapping[:size],
            block_size=self.block_size,
            query_start_loc_list=list(range(size + 1)),
            # Host copies are not refreshed per replay: backends used here must not read them
            # beyond the query layout (the Triton kernel reads lengths from the tensors).
            seq_lens_list=[1] * size,
            num_computed_list=[0] * size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        with forward_context(self._metadata(size), self.kv_caches):
            return self.model(self.input_ids[:size], self.positions[:size])

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: autotuning and lazy init outside the capture
                    self._forward(size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self._forward(size)
            self._graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode graphs for batch sizes %s", self.sizes)
