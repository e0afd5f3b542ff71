"""Throughput benchmarks: this project against an equivalent PyTorch implementation."""
