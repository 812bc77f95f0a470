"""Random GSSM parameters for the tests: the spec's initialisation with its constant entries (D, freq_ratio,
the low/high weights) randomised, so that every parameter changes the output."""
import dataclasses

import torch

from gmamba_ext.gssm_reference import GSSMConfig, GSSMParams

f64 = torch.float64


def make(C=16, seed=0, dtype=f64, **kw):
    """(config, params, generator) for GSSMConfig(C, **kw)."""
    cfg = GSSMConfig(C, **kw)
    g = torch.Generator().manual_seed(seed)
    p = GSSMParams.init(cfg, generator=g, dtype=f64)
    sd = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=f64) if k.endswith(("D", "freq_ratio",
          "low_freq_weight", "high_freq_weight")) or "D_" in k else v for k, v in p.to_state_dict().items()}
    sd = {k: v.to(dtype) for k, v in sd.items()}
    return cfg, GSSMParams.from_state_dict(sd, cfg), g


def perturb(p, keys, g):
    return p.replace(**{k: p[k] + torch.randn(p[k].shape, generator=g, dtype=f64) for k in keys})


def cast(p, dtype=None, device=None):
    """The same parameters in another dtype / on another device."""
    return GSSMParams(**{k: (v.to(dtype=dtype, device=device) if v is not None else None)
                         for k, v in vars(p).items()})


def param_fields(p):
    """Names of the GSSMParams fields that hold tensors."""
    return [f.name for f in dataclasses.fields(p) if getattr(p, f.name) is not None]


def grads_of(fn, x, p, dout, dtype, device="cpu"):
    """Gradients of fn(x, params) . dout with respect to x and every parameter, in dtype on device."""
    names = param_fields(p)
    xs = x.to(dtype=dtype, device=device).requires_grad_()
    ts = [getattr(p, n).to(dtype=dtype, device=device).requires_grad_() for n in names]
    fn(xs, p.replace(**dict(zip(names, ts)))).backward(dout.to(dtype=dtype, device=device))
    return ["x"] + names, [xs.grad] + [t.grad for t in ts]


def assert_bitwise_reproducible(x, p, key, **options):
    """gssm forward and the gradients of x and parameter `key` are identical over two runs."""
    from gmamba_ext import gssm

    def run():
        xs = x.clone().requires_grad_()
        w = p[key].clone().requires_grad_()
        out = gssm(xs, p.replace(**{key: w}), **options)
        out.square().sum().backward()
        return out, xs.grad, w.grad

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)
