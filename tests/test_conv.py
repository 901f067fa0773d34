"""Every `site_conv` implementation equals `lax.conv_general_dilated` applied per site.

Values and gradients (wrt x and w) on small shapes, 3x3 and 1x1 kernels, several channel
counts, under:
  - `vmap` over sites with per-site kernels, the gradient taken outside the vmap and
    inside it (the engine's pattern: `vmap(value_and_grad(site_step))`);
  - `vmap` with an unbatched kernel (the fold path) and with an unbatched input;
  - nested `vmap` (sites outer with per-site kernels, images inner sharing the kernel);
  - per-example gradients wrt a shared kernel (`vmap(vjp)`, kernel unbatched);
all under `jit`. Then a whole SegModel (base 4, 32 px, PCS + HC, 3 sites) gives the same
loss and gradients with each implementation under `vmap` over sites as a Python loop of
unmapped sites (where `site_conv` is a plain convolution).

Speed: every case for one implementation is one jitted function, so the file compiles
8 programs (reference + 3 implementations, for the conv cases and for the model); they
compile with XLA's backend optimisations off (tiny shapes: compile time dominates) and
two at a time in threads (XLA compiles without the GIL).
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lcfed_jax.models.conv import IMPLEMENTATIONS, same_padding, site_conv

REF = "reference"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

K, B, H, W = 3, 2, 5, 6
# (kernel, Ci, Co): 3x3 and 1x1; one input channel, odd counts, wider.
SHAPES = [((3, 3), 1, 2), ((3, 3), 5, 4), ((3, 3), 8, 3), ((1, 1), 3, 2), ((1, 1), 6, 5)]


def ref_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), list(same_padding(w.shape[:2])),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=lax.Precision.HIGHEST)


def _compile_all(jobs):
  """jobs: {name: (fn, args)} -> {name: outputs}. Lower here (needs the GIL), compile
  two at a time in threads, then run."""
  lowered = {k: jax.jit(f).lower(*args) for k, (f, args) in jobs.items()}
  with ThreadPoolExecutor(2) as pool:
    futures = {k: pool.submit(lo.compile, compiler_options=FAST_COMPILE) for k, lo in lowered.items()}
    compiled = {k: fut.result() for k, fut in futures.items()}
  return {k: jax.block_until_ready(compiled[k](*jobs[k][1])) for k in jobs}


def _mismatches(got, want, tol, prefix=""):
  """Max-abs error relative to max(1, max |want|), per leaf; returns failure strings."""
  bad = []
  flat_w = jax.tree_util.tree_leaves_with_path(want)
  flat_g = jax.tree.leaves(got)
  assert len(flat_w) == len(flat_g)
  for (path, b), a in zip(flat_w, flat_g):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    name = prefix + jax.tree_util.keystr(path)
    if a.shape != b.shape:
      bad.append(f"{name}: shape {a.shape} != {b.shape}")
      continue
    scale = max(1.0, float(np.max(np.abs(b))))
    err = float(np.max(np.abs(a - b)))
    if not np.isfinite(err) or err > tol * scale:
      bad.append(f"{name}: max abs err {err:.3g} > {tol * scale:.3g}")
  return bad


def _vjp(f, *args_and_g):
  *args, g = args_and_g
  y, pull = jax.vjp(f, *args)
  return (y,) + tuple(pull(g))


def _stack(outs):
  return tuple(jnp.stack(o) for o in zip(*outs))


# ---- the cases: each returns (y, dx, dw); impl == REF is the per-site reference ---------

def case_sites_grad_outside(impl, x, w, g):
  """vjp(vmap(conv)) over sites, per-site kernels."""
  if impl == REF:
    f = lambda x, w: jnp.stack([ref_conv(x[i], w[i]) for i in range(K)])
  else:
    f = jax.vmap(functools.partial(site_conv, impl=impl))
  return _vjp(f, x, w, g)


def case_sites_grad_inside(impl, x, w, g):
  """vmap(vjp(conv)) over sites: the engine's vmap(value_and_grad(site_step))."""
  conv = ref_conv if impl == REF else functools.partial(site_conv, impl=impl)
  one = lambda x, w, g: _vjp(conv, x, w, g)
  if impl == REF:
    return _stack([one(x[i], w[i], g[i]) for i in range(K)])
  return jax.vmap(one)(x, w, g)


def case_shared_kernel(impl, x, w, g):
  """vmap over sites, one kernel for all (the fold path); dw sums over sites."""
  if impl == REF:
    f = lambda x, w0: jnp.stack([ref_conv(x[i], w0) for i in range(K)])
  else:
    f = jax.vmap(functools.partial(site_conv, impl=impl), in_axes=(0, None))
  return _vjp(f, x, w[0], g)


def case_shared_input(impl, x, w, g):
  """vmap over sites, one input, per-site kernels; dx sums over sites."""
  if impl == REF:
    f = lambda x0, w: jnp.stack([ref_conv(x0, w[i]) for i in range(K)])
  else:
    f = jax.vmap(functools.partial(site_conv, impl=impl), in_axes=(None, 0))
  return _vjp(f, x[0], w, g)


def case_nested(impl, x, w, g):
  """Sites outer (per-site kernels), images inner (shared kernel), one image per call."""
  x6, g6 = x[:, :, None], g[:, :, None]   # [K, B, 1, H, W, C]
  if impl == REF:
    f = lambda x6, w: jnp.stack([jnp.stack([ref_conv(x6[i, j], w[i]) for j in range(B)])
                                 for i in range(K)])
  else:
    conv = functools.partial(site_conv, impl=impl)
    f = jax.vmap(jax.vmap(conv, in_axes=(0, None)), in_axes=(0, 0))
  y, dx, dw = _vjp(f, x6, w, g6)
  return y[:, :, 0], dx[:, :, 0], dw


def case_per_example(impl, x, w, g):
  """Per-example gradients wrt a shared kernel: vmap(vjp) with the kernel unbatched."""
  conv = ref_conv if impl == REF else functools.partial(site_conv, impl=impl)
  one = lambda x, g: _vjp(conv, x, w[0], g)
  if impl == REF:
    return _stack([one(x[i], g[i]) for i in range(K)])
  return jax.vmap(one)(x, g)


def case_unmapped(impl, x, w, g):
  """No vmap at all: a plain convolution."""
  conv = ref_conv if impl == REF else functools.partial(site_conv, impl=impl)
  return _vjp(conv, x[0], w[0], g[0])


CASES = [case_sites_grad_outside, case_sites_grad_inside, case_shared_kernel,
         case_shared_input, case_nested, case_per_example, case_unmapped]


def _conv_data():
  rng = np.random.default_rng(0)
  data = {}
  for kernel, ci, co in SHAPES:
    x = rng.standard_normal((K, B, H, W, ci)).astype(np.float32)
    w = rng.standard_normal((K,) + kernel + (ci, co)).astype(np.float32)
    g = rng.standard_normal((K, B, H, W, co)).astype(np.float32)   # output cotangent
    data[f"k{kernel[0]}_ci{ci}_co{co}"] = (x, w, g)
  return data


def _all_conv_cases(impl, data):
  return {f"{case.__name__[5:]}/{shape}": dict(zip(("y", "dx", "dw"), case(impl, *xwg)))
          for shape, xwg in data.items() for case in CASES}


# ---- the model --------------------------------------------------------------------------

NUM_SITES, SIZE = 3, 64


def _model_and_inputs():
  """SegModel (base 4, PCS + HC) and random per-site params of the init's shapes (no init
  compile: He-normal kernels, small biases).

  Conditioning matters: at 32 px the bottleneck is 2x2, and instance norm over 4 values
  of a near-constant map (large biases, ReLU zeros) amplifies float reordering by 100x
  or more, so two correct implementations can differ by percents. With small biases every
  implementation agrees with the reference to ~1e-5 relative."""
  from conftest import tiny_config
  from lcfed_jax.fed import setup
  from lcfed_jax.fed.methods import get_method
  c = tiny_config("lcfed", image_size=SIZE, **{"model.base": 4, "model.dtype": "float32",
                                               "lcfed.pcs": True, "lcfed.hc": True})
  m = get_method(c)
  assert m.model.pcs and m.model.hc
  model = setup.build_model(c, m, NUM_SITES, 3, 1)
  x1 = jnp.zeros((1, SIZE, SIZE, 3))
  shapes = jax.eval_shape(lambda k: model.init(k, x1, 0, train=False),
                          jax.random.PRNGKey(0))["params"]
  rng = np.random.default_rng(1)

  def fill(s):
    if len(s.shape) == 1:   # biases: small, so that no feature map is near-constant
      a = 0.01 * rng.standard_normal((NUM_SITES,) + s.shape)
    else:                   # kernels / matrices: He-normal over the fan-in
      a = rng.standard_normal((NUM_SITES,) + s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    return jnp.asarray(a.astype(np.float32))

  params = jax.tree.map(fill, shapes)
  x = jnp.asarray(rng.uniform(size=(NUM_SITES, 2, SIZE, SIZE, 3)).astype(np.float32))
  y = jnp.asarray((rng.uniform(size=(NUM_SITES, 2, SIZE, SIZE, 1)) > 0.6).astype(np.float32))
  return model, params, x, y


def _seg_loss(model, params, x, y, site, heads):
  """Stage A's loss with HC joint: Dice(own head) + Dice(HC) + 0.1 L_con."""
  from lcfed_jax.fed.losses import dice_loss
  from lcfed_jax.models.unet import SegModel
  v = {"params": params}
  out = model.apply(v, x, site, train=True, heads=heads)
  loss = dice_loss(out["probs"], y) + dice_loss(out["hc"], y)
  return loss + 0.1 * model.apply(v, out["pcs_in"], site, method=SegModel.contrastive)


def _model_grads(model, impl, params, x, y):
  heads = dict(params["head"])   # every site's head, passed as a constant (as the engine)
  sites = jnp.arange(NUM_SITES)
  m = model.clone(impl="unroll" if impl == REF else impl)
  vg = lambda p, x, y, s: jax.value_and_grad(functools.partial(_seg_loss, m), argnums=(0, 1))(
      p, x, y, s, heads)
  if impl == REF:   # unmapped sites (a scan, one copy of the graph): plain convolutions
    loss, grads = lax.map(lambda a: vg(*a), (params, x, y, sites))
  else:
    loss, grads = jax.vmap(vg)(params, x, y, sites)
  return {"loss": loss, "grad_params": grads[0], "grad_x": grads[1]}


# ---- tests ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results():
  data = _conv_data()
  model, params, x, y = _model_and_inputs()
  jobs = {}
  for impl in (REF,) + IMPLEMENTATIONS:
    jobs[("conv", impl)] = (functools.partial(_all_conv_cases, impl), (data,))
    jobs[("model", impl)] = (functools.partial(_model_grads, model, impl), (params, x, y))
  return _compile_all(jobs)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_site_conv_matches_per_site_conv(results, impl):
  got, want = results[("conv", impl)], results[("conv", REF)]
  bad = _mismatches(got, want, tol=2e-5)
  assert not bad, f"{impl}: " + "; ".join(bad)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_segmodel_same_loss_and_grads(results, impl):
  got, want = results[("model", impl)], results[("model", REF)]
  assert np.all(np.isfinite(np.asarray(want["loss"])))
  assert float(np.max(np.abs(np.asarray(want["grad_x"])))) > 0
  bad = _mismatches(got, want, tol=1e-4)
  assert not bad, f"{impl}: " + "; ".join(bad)


def test_unknown_impl_raises():
  with pytest.raises(ValueError):
    site_conv(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), "nope")
