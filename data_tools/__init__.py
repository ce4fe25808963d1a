"""Shard tools: build, synth, verify, stats, inspect, dedup, split, train-tokenizer."""
