//! Ops with hand-written backward, one per file beside its reference test (llm.c style).

pub mod frozen_matmul;
