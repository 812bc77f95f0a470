"""Capturing a CUDA-graph replay of a forward + backward step: shared by the CUDA-graph tests and
benchmarks/graph_gssm_gpu.py."""
import torch


def capture_cuda_graph(step, warmup=2):
    """Runs step() `warmup` times on a side stream (capture needs its warm-up off the default stream), then
    captures one call in a CUDA graph: returns (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured
