"""Memory and FLOP planner for looped-model pretraining: which parallel layouts fit, and how long.

Everything is computed from the config, analytically, so a 3.5B plan takes milliseconds and no
GPU. The pieces and their conventions:

Parameters  counted exactly as `LoopedLM` builds them (the tests compare with an instantiated
            model): embedding (+ learned positions), prelude, core (blocks + adapter + state
            norm: the weights every iteration reuses), coda (+ final norm), head (untied
            lm_head, exit gate).
Layout      world = nodes × gpus_per_node = tp · pp · dp. TP (within a node) shards the
            attention/MLP matrices, the embedding, the head and the adapter (row-parallel);
            norms are replicated. PP splits the *core's blocks* over stages (every iteration passes
            through all stages); the prelude and adapter sit on the first stage, the state norm,
            coda and head on the last (a tied head keeps no copy there: it receives the
            embedding weight each step, counted as transient). The vocabulary is padded to a
            multiple of tp, as parallel/tensor.py builds it. Memory is reported for the
            fullest stage.
Model state per parameter, ZeRO paper accounting. fp32: 4 weights + 4 grads + 8 Adam (m, v).
            bf16 mixed precision: 2 weights + 2 grads + 12 (fp32 master, m, v). ZeRO-1 shards
            the optimizer state over dp, ZeRO-2 also the gradients.
Activations the tensors autograd saves for backward, per microbatch of b sequences × T tokens,
            from a per-block census of what LoopedLM's code saves (norm inputs and outputs, q/k
            before and after RoPE, SDPA's q, k, v, output and log-sum-exp, the MLP's
            intermediates, the log-probabilities of the loss in fp32). Without checkpointing a
            step keeps n_grad iterations of activations; with loop checkpointing only each
            iteration's input state plus one iteration being recomputed in backward; with block
            checkpointing each block's input plus one block. The no-grad iterations keep
            nothing. Verified on CPU in fp32 against the bytes a saved-tensors hook sees (see
            docs/plan.md); in bf16 the same census is used with 2-byte activations, an
            estimate. The loop pipeline holds about pp microbatches' activations on a
            stage under the 1f1b schedule, all M under gpipe: the planner counts the passes
            the schedule holds (`parallel.schedule.peak_held`).
Transient   not saved but live at the peak: the fp32 gradient of the logits, and the working
            set of one block (its MLP intermediates). An estimate, added before the fit test.
Depth       r, n_free, n_grad from `DepthSampler` itself (after any curriculum), 10,000 draws:
            the mean for FLOPs and the 99th percentile for memory.
FLOPs/token 6·(N_outer + r̄_grad·N_core) + 2·r̄_free·N_core + attention, where N_outer is the
            prelude, the coda and the head matrix, N_core one iteration's weights; attention
            per layer and token 12·h·T for a gradient-carrying pass and 4·h·T for a no-grad one
            (PaLM's convention: full T, a causal kernel does half). Recompute is excluded, as
            in MFU."""
from stars_scale.plan.counting import (BlockParams, DepthStats, Flops, ParamCounts, block_params, depth_stats,
                                      flops_per_token, param_counts)
from stars_scale.plan.memory import (ActivationBytes, GiB, StageShape, StateBytes, activation_bytes, block_activation_elems,
                                    fmt_bytes, stage_param_elems, stage_shapes, state_bytes)
from stars_scale.plan.report import fmt_count, format_plan, plan_to_dict
from stars_scale.plan.search import GPUS, GPUSpec, LayoutPlan, Plan, evaluate_layout, plan

__all__ = ["BlockParams", "DepthStats", "Flops", "ParamCounts", "block_params", "depth_stats", "flops_per_token",
           "param_counts", "ActivationBytes", "StageShape", "StateBytes", "activation_bytes", "block_activation_elems",
           "stage_param_elems", "stage_shapes", "state_bytes", "fmt_bytes", "fmt_count", "format_plan", "plan_to_dict",
           "GPUS", "GiB", "GPUSpec", "LayoutPlan", "Plan", "evaluate_layout", "plan"]
