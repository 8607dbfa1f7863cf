"""GPO module (vse_fast.modules.gpo) against the faithful re-implementation of the published GPO,
and MaxPool / AvgPool / KMaxPool against direct torch definitions."""
import pytest
import torch

from tests.conftest import interpreter_only, requires_cuda
from tests.published.gpo import PublishedGPO
from vse_fast.modules.gpo import GPO, AvgPool, KMaxPool, MaxPool


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1e-30)).item()


def make_pair(d_pe=32, d_hidden=32, device="cpu"):
    published = PublishedGPO(d_pe, d_hidden).to(device)
    ours = GPO(d_pe, d_hidden).to(device)
    ours.load_state_dict(published.state_dict(), strict=True)
    return published, ours


def random_lengths(B, K, device="cpu"):
    """Unsorted lengths in 1..K containing 1 and K (when B >= 2)."""
    n = torch.randint(1, K + 1, (B,), device=device)
    n[torch.randperm(B)[: min(B, 2)]] = torch.tensor([1, K], device=device)[: min(B, 2)]
    return n


def tie_free_features(B, K, D, device="cpu"):
    """(B, K, D) float32 features whose K entries in every column are distinct, also in bf16/fp16: a random
    permutation of K values 1/8 apart, shifted by a random multiple of 1/8 per column. The published
    module sorts with torch.sort, which may order equal values either way, so its gradient to the
    features is defined by the tie-free sets only (float32 randn ties about once in 600 draws of B=16,
    K=36, D=64, and bf16 almost always)."""
    ranks = torch.rand(B, K, D, device=device).argsort(dim=1).float()
    shift = torch.randint(-8, 9, (B, 1, D), device=device).float()
    return (ranks - K // 2 + shift) / 8


def test_tie_free_features_are_distinct_in_every_column_and_dtype():
    features = tie_free_features(16, 36, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ordered = features.to(dtype).sort(dim=1).values
        assert (ordered[:, 1:] > ordered[:, :-1]).all(), dtype


def test_state_dict_round_trip_both_ways():
    published, ours = PublishedGPO(32, 32), GPO(32, 32)
    ours.load_state_dict(published.state_dict(), strict=True)
    for (name_p, p), (name_o, o) in zip(published.state_dict().items(), ours.state_dict().items()):
        assert name_p == name_o and torch.equal(p, o)
    fresh = PublishedGPO(32, 32)
    fresh.load_state_dict(GPO(32, 32).state_dict(), strict=True)
    assert GPO(32, 32).state_dict().keys() == published.state_dict().keys()


PARITY_CASES = [(9, 13, 17, "float"), (1, 1, 5, "long"), (16, 36, 64, "float"), (5, 20, 3, "int")]


@pytest.mark.parametrize("B,K,D,length_type", PARITY_CASES, ids=[f"B{b}-K{k}-D{d}-{t}" for b, k, d, t in PARITY_CASES])
def test_parity_with_published(B, K, D, length_type):
    published, ours = make_pair()
    lengths = random_lengths(B, K).to({"float": torch.float32, "long": torch.long, "int": torch.int32}[length_type])
    features = tie_free_features(B, K, D)
    x_pub, x_ours = features.clone().requires_grad_(), features.clone().requires_grad_()
    pooled_pub, weights_pub = published(x_pub, lengths)
    pooled_ours, weights_ours = ours(x_ours, lengths)
    assert pooled_ours.shape == pooled_pub.shape and weights_ours.shape == weights_pub.shape
    assert rel_err(pooled_ours, pooled_pub) < 1e-5
    assert rel_err(weights_ours, weights_pub) < 1e-5

    grad_pooled, grad_weights = torch.randn_like(pooled_pub), torch.randn_like(weights_pub)
    ((pooled_pub * grad_pooled).sum() + (weights_pub * grad_weights).sum()).backward()
    ((pooled_ours * grad_pooled).sum() + (weights_ours * grad_weights).sum()).backward()
    assert rel_err(x_ours.grad, x_pub.grad) < 1e-5
    params_pub = dict(published.named_parameters())
    for name, p in ours.named_parameters():
        # each GRU bias gradient sums B*K gate terms of both signs, in another order than the published
        # GRU: over 7300 draws ours differed from it by up to 2.3e-5 (1e-5 failed 0.1-0.4% of draws), and
        # the published float32 module is itself up to 1.9e-5 from its float64 run
        assert rel_err(p.grad, params_pub[name].grad) < 1e-4, name


def test_a_large_score_layer_keeps_the_padding_weights_zero_as_published():
    """Positions >= n are scored -10000 before the softmax, as published. At the default init the
    scores stay within about 6, where any padding score below about -80 underflows alike; a score
    layer with large weights (scores near -1200 here) shows it: with -100 the softmax mass went to
    the padding positions."""
    published = PublishedGPO(8, 8)
    with torch.no_grad():
        published.linear.weight.fill_(-150.0)
        for name, p in published.gru.named_parameters():
            if name.startswith("bias_ih"):  # gates (r, z, n): z ~ 0, n ~ tanh(6): every output ~ +1
                p.copy_(torch.tensor([0.0, -6.0, 6.0]).repeat_interleave(8))  # scores ~ -150 * 8 = -1200
    ours = GPO(8, 8, table_backend="torch")  # the Triton table has its own padding rule
    ours.load_state_dict(published.state_dict())
    features, lengths = tie_free_features(3, 5, 4), torch.tensor([5, 2, 3])
    with torch.no_grad():
        pooled, weights = ours(features, lengths)
        expected_pooled, expected_weights = published(features, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert not weights[b, n:].any(), weights[b, :, 0]
    # softmax exponents near -12000: float32 rounding of the scores moves a weight by up to ~5e-4
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-2)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-2)


def test_pool_equals_forward_and_trains_parameters():
    _, ours = make_pair()
    features, lengths = torch.randn(6, 11, 7), random_lengths(6, 11)
    pooled, _ = ours(features, lengths)
    fast = ours.pool(features, lengths.float())
    torch.testing.assert_close(fast, pooled, rtol=1e-6, atol=1e-6)
    coefficients = ours.coefficients(lengths, 11)
    assert coefficients.shape == (6, 11)
    for b, n in enumerate(lengths.tolist()):
        assert not coefficients[b, n:].any()
        torch.testing.assert_close(coefficients[b, :n].sum(), torch.tensor(1.0))
    fast.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())


def test_eval_cache_reused_and_invalidated():
    published, ours = make_pair()
    features, lengths = torch.randn(5, 9, 4), random_lengths(5, 9)
    ours.eval()
    with torch.no_grad():
        first = ours(features, lengths)
        builds = ours.table_builds
        second = ours(features, lengths)
        ours.pool(features, lengths)
        assert ours.table_builds == builds, "eval mode recomputed the coefficients"
        torch.testing.assert_close(second, first, rtol=0, atol=0)

    # an optimizer step changes the parameters in place: the cache must not serve stale weights
    ours.train()
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.5)
    ours.pool(features, lengths).pow(2).sum().backward()
    optimizer.step()
    ours.eval()
    published.load_state_dict(ours.state_dict())
    with torch.no_grad():
        pooled, weights = ours(features, lengths)
        assert ours.table_builds > builds
        expected_pooled, expected_weights = published(features, lengths)
    assert rel_err(weights, expected_weights) < 1e-5 and rel_err(pooled, expected_pooled) < 1e-5

    builds = ours.table_builds
    other = PublishedGPO(32, 32)
    ours.load_state_dict(other.state_dict())
    with torch.no_grad():
        pooled, weights = ours(features, lengths)
        expected_pooled, expected_weights = other(features, lengths)
    assert ours.table_builds == builds + 1
    assert rel_err(weights, expected_weights) < 1e-5 and rel_err(pooled, expected_pooled) < 1e-5


def test_eval_cache_serves_shorter_sets_from_a_longer_table():
    """The cached table over sizes 1..K' serves every batch of sets up to K' long, with the published
    weights: without that, each shorter batch rebuilt the table and replaced the longer one, which
    the next long batch rebuilt again."""
    published, ours = make_pair()
    ours.eval()
    features, lengths = torch.randn(2, 6, 4), torch.tensor([6, 2])
    with torch.no_grad():
        ours(torch.randn(3, 10, 4), torch.tensor([10, 4, 7]))
        builds = ours.table_builds
        pooled, weights = ours(features, lengths)
        ours.pool(torch.randn(2, 5, 4), torch.tensor([5, 3]))
        assert ours.table_builds == builds, "a shorter batch rebuilt the cached table"
        ours(torch.randn(1, 10, 4), torch.tensor([10]))
        assert ours.table_builds == builds, "the longer table was replaced by a shorter one"
        expected_pooled, expected_weights = published(features, lengths)
    assert weights.shape == expected_weights.shape == (2, 6, 1)
    assert rel_err(weights, expected_weights) < 1e-5 and rel_err(pooled, expected_pooled) < 1e-5


def test_coefficients_have_k_columns_when_the_cached_table_is_longer():
    """coefficients(lengths, K) is (B, K), as documented, also when the eval cache holds a table over
    more sizes than K: without the cut to K columns it returned the cached table's width."""
    _, ours = make_pair()
    ours.eval()
    lengths = torch.tensor([6, 2, 4])
    with torch.no_grad():
        ours(torch.randn(2, 12, 4), torch.tensor([12, 5]))  # caches a table over the sizes 1..12
        builds = ours.table_builds
        coefficients = ours.coefficients(lengths, 6)
        assert ours.table_builds == builds  # served from the cached table
    assert coefficients.shape == (3, 6)
    ours.train()  # no cache: a table over the sizes 1..6
    torch.testing.assert_close(coefficients, ours.coefficients(lengths, 6))


@pytest.mark.parametrize("optimizer", ["adamw_fused", "adamw_foreach", "sgd"])
def test_eval_cache_rebuilt_after_any_optimizer_step(optimizer):
    """Fused optimizers (AdamW(fused=True), the trainer's on CUDA) write the parameters without bumping
    their version counters: every torch.optim step still invalidates the cache, also when the module
    stays in eval mode between the step and the next cached call (frozen BatchNorm fine-tuning)."""
    published, ours = make_pair()
    features, lengths = torch.randn(4, 7, 5), random_lengths(4, 7)
    make = {"adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.05, fused=True),
            "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.05, foreach=True),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.5)}[optimizer]
    opt = make(ours.parameters())
    ours.eval()
    for _ in range(2):
        with torch.no_grad():
            ours.pool(features, lengths)  # cached
        ours(features, lengths)[0].pow(2).sum().backward()  # gradients on: no cache
        opt.step()
        opt.zero_grad()
        published.load_state_dict(ours.state_dict())
        with torch.no_grad():
            pooled, weights = ours(features, lengths)
            expected_pooled, expected_weights = published(features, lengths)
        assert rel_err(weights, expected_weights) < 1e-5 and rel_err(pooled, expected_pooled) < 1e-5


@pytest.mark.parametrize("hook", ["prune", "weight_norm"])
def test_pruning_and_weight_norm_of_the_linear_layer_act_as_published(hook):
    """torch.nn.utils.prune / weight_norm rebuild linear.weight in a forward pre-hook; the Triton table
    reads the weight without calling linear, so it runs those hooks itself: training steps, loading a pruned
    state dict and pruning again in eval mode give the published module's outputs."""
    import warnings

    from torch.nn.utils import prune

    def wrap(module):
        if hook == "prune":
            prune.l1_unstructured(module.linear, "weight", amount=0.5)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the older weight_norm: deprecated, still used
                torch.nn.utils.weight_norm(module.linear)
        return module

    published, ours = (wrap(m) for m in make_pair())
    features, lengths = torch.randn(3, 6, 4), random_lengths(3, 6)
    for module in (published, ours):
        opt = torch.optim.SGD(module.parameters(), lr=0.05)
        for _ in range(2):
            opt.zero_grad()
            module(features, lengths)[0].pow(2).sum().backward()
            opt.step()
    for a, b in zip(ours(features, lengths), published(features, lengths)):
        assert rel_err(a, b) < 1e-4  # fp32 rounding, moved by two steps
    if hook == "prune":
        for module in (published, ours):
            module.eval()
        with torch.no_grad():
            ours(features, lengths)  # cached
            for module in (published, ours):
                prune.l1_unstructured(module.linear, "weight", amount=0.5)  # the mask buffer changes
            assert rel_err(ours(features, lengths)[0], published(features, lengths)[0]) < 1e-5


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao.quantization's notices
@pytest.mark.parametrize("wrapper", ["spectral_norm", "forward_hook", "quantize_dynamic", "parametrize"])
def test_a_wrapped_or_hooked_score_layer_is_called_as_published(wrapper):
    """The published GPO calls its linear layer; ours calls it too on the torch table path (the fused
    Triton table, which reads the weight, is for plain layers only): its hooks fire and wrappers apply."""
    published, ours = make_pair()
    seen = {}

    def wrap(module):
        if wrapper == "spectral_norm":
            torch.nn.utils.spectral_norm(module.linear)
        elif wrapper == "forward_hook":
            module.linear.register_forward_hook(lambda m, args, out: seen.setdefault(id(module), []).append(out))
        elif wrapper == "parametrize":
            torch.nn.utils.parametrize.register_parametrization(module.linear, "weight", _Doubled())
        else:
            if not hasattr(torch.ao.quantization, "quantize_dynamic"):
                pytest.skip("this torch has no torch.ao.quantization.quantize_dynamic")
            module = torch.ao.quantization.quantize_dynamic(module.eval(), {torch.nn.Linear}, dtype=torch.qint8)
        return module

    torch.manual_seed(0)
    published, ours = wrap(published), wrap(ours)
    published.load_state_dict(ours.state_dict())  # the spectral_norm power-iteration vectors alike
    features, lengths = torch.randn(3, 6, 4), random_lengths(3, 6)
    pooled, weights = ours(features, lengths)
    expected_pooled, expected_weights = published(features, lengths)
    assert rel_err(weights, expected_weights) < 1e-5 and rel_err(pooled, expected_pooled) < 1e-5
    if wrapper == "forward_hook":
        assert len(seen[id(ours)]) == len(seen[id(published)]) == 1
    if wrapper == "spectral_norm":
        pooled.pow(2).sum().backward()
        assert ours.linear.weight_orig.grad is not None and ours.linear.weight_orig.grad.abs().sum() > 0
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.pool(features, lengths), ours(features, lengths)[0])


def test_gradient_penalty_through_gpo_matches_published():
    """Double backward (d/dparams of |d pooled / d features|^2) on the CPU torch path, as published.
    Second derivatives through the temperature-0.1 softmax amplify float32 rounding: over 1500 seeds
    the parameter gradients differed by up to 3.5e-4 relative (our float32 from our float64 alike),
    so 2e-3 (at 1e-4 it failed about 1 seed in 500); a wrong formula differs by O(1)."""
    published, ours = make_pair()
    features, lengths = tie_free_features(3, 5, 4), random_lengths(3, 5)
    grads = []
    for module in (published, ours):
        x = features.clone().requires_grad_()
        (gx,) = torch.autograd.grad(module(x, lengths)[0].pow(2).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(gx.pow(2).sum(), [x, *module.parameters()]))
    for ours_grad, published_grad in zip(grads[1], grads[0]):
        assert rel_err(ours_grad, published_grad) < 2e-3


def test_table_backend_triton_refuses_a_hooked_score_layer():
    gpo = GPO(32, 32, table_backend="triton")
    gpo.linear.register_forward_hook(lambda *args: None)
    with pytest.raises(TypeError, match="table_backend='triton' reads the weights of a plain nn.GRU"):
        gpo(torch.randn(2, 3, 4), torch.tensor([3, 1]))


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_eval_cache_misses_data_writes_until_clear_cache():
    """Documented limit: `.data` writes keep the version counter the cache keys on; clear_cache()
    drops the table, and so does train() (eval -> train -> eval rebuilds; autograd-visible in-place
    writes are detected without either)."""
    published, ours = make_pair()
    features, lengths = torch.randn(4, 7, 5), random_lengths(4, 7)
    ours.eval()
    with torch.no_grad():
        ours.pool(features, lengths)
        builds = ours.table_builds
        for p in ours.parameters():
            p.data.mul_(0.5)
        ours.pool(features, lengths)
        assert ours.table_builds == builds, ".data writes are documented as not detected"
        ours.clear_cache()
        pooled = ours.pool(features, lengths)
        assert ours.table_builds == builds + 1
        published.load_state_dict(ours.state_dict())
        assert rel_err(pooled, published(features, lengths)[0]) < 1e-5
        ours.linear.weight.mul_(2.0)  # autograd-visible in-place write: detected
        pooled = ours.pool(features, lengths)
        assert ours.table_builds == builds + 2
        published.load_state_dict(ours.state_dict())
        assert rel_err(pooled, published(features, lengths)[0]) < 1e-5
        for p in ours.parameters():
            p.data.mul_(0.5)
        ours.train()
        ours.eval()
        pooled = ours.pool(features, lengths)
        assert ours.table_builds == builds + 3
        published.load_state_dict(ours.state_dict())
        assert rel_err(pooled, published(features, lengths)[0]) < 1e-5


def test_eval_cache_built_under_autocast_is_the_fp32_table():
    """The torch-path table is computed with autocast off: a table cached under CPU bf16 autocast
    is the float32 table, and reusing it outside autocast gives the float32 results."""
    published, ours = make_pair()
    features, lengths = torch.randn(5, 8, 6), random_lengths(5, 8)
    ours.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, weights_autocast = ours(features, lengths)
        pooled, weights = ours(features, lengths)
        expected_pooled, expected_weights = published(features, lengths)
    assert ours.table_builds == 1
    assert weights_autocast.dtype == weights.dtype == torch.float32
    assert rel_err(weights, expected_weights) < 1e-5 and rel_err(pooled, expected_pooled) < 1e-5
    torch.testing.assert_close(weights_autocast, weights, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_features_pool_to_the_published_float32(dtype):
    """16-bit features outside autocast: the published module's float32 weights promote the pooled
    output to float32. The drop-in forward gives that dtype and those values (the 16-bit values taken
    exactly), and the same 16-bit feature gradients; pool() keeps the features' dtype."""
    published, ours = make_pair()
    B, K, D = 6, 9, 5
    features, lengths = tie_free_features(B, K, D).to(dtype), random_lengths(B, K).float()
    x_pub, x_ours = features.clone().requires_grad_(), features.clone().requires_grad_()
    pooled_pub, _ = published(x_pub, lengths)
    pooled_ours, _ = ours(x_ours, lengths)
    assert pooled_ours.dtype == pooled_pub.dtype == torch.float32
    assert rel_err(pooled_ours, pooled_pub) < 1e-5
    g = torch.randn(B, D)
    pooled_pub.backward(g)
    pooled_ours.backward(g)
    assert x_ours.grad.dtype == x_pub.grad.dtype == dtype
    assert rel_err(x_ours.grad.float(), x_pub.grad.float()) < 1e-2  # one 16-bit rounding each
    assert ours.pool(features, lengths).dtype == dtype


def test_empty_batch_forward_matches_pool():
    """B = 0: forward returns (0, D) pooled and (0, 0, 1) weights, like pool / gpo_pool return (0, D)."""
    features = torch.randn(0, 5, 3, requires_grad=True)
    for module in (GPO(4, 3), GPO(4, 3).eval(), MaxPool(), AvgPool(), KMaxPool(2)):
        for lengths in (torch.zeros(0, dtype=torch.long), torch.zeros(0)):
            pooled, weights = module(features, lengths)
            assert pooled.shape == (0, 3) and pooled.dtype == features.dtype
            assert weights.shape == (0, 0, 1)
            torch.testing.assert_close(module.pool(features, lengths), pooled)
            (grad,) = torch.autograd.grad(pooled.sum(), features)
            assert grad.shape == (0, 5, 3)
    weights, mask = GPO(4, 3).compute_pool_weights(torch.zeros(0, dtype=torch.long))
    assert weights.shape == mask.shape == (0, 0, 1) and mask.dtype == torch.bool


def test_training_mode_never_caches():
    _, ours = make_pair()
    features, lengths = torch.randn(3, 6, 4), random_lengths(3, 6)
    builds = ours.table_builds
    ours(features, lengths)
    ours.pool(features, lengths)
    assert ours.table_builds == builds + 2


class _Coefficients(torch.nn.Module):
    """Routes functional_call to GPO.coefficients."""

    def __init__(self, gpo):
        super().__init__()
        self.gpo = gpo

    def forward(self, lengths, K):
        return self.gpo.coefficients(lengths, K)


def test_coefficient_path_gradcheck_fp64():
    wrapper = _Coefficients(GPO(4, 3).double())
    names = [name for name, _ in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in wrapper.parameters())
    lengths = torch.tensor([3, 1, 4])
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(wrapper, dict(zip(names, ps)), (lengths, 4)), params
    )


def test_gpo_input_errors():
    gpo = GPO(32, 32)
    with pytest.raises(ValueError, match="even d_pe.*d_pe=7"):
        GPO(7, 32)
    with pytest.raises(ValueError, match=r"in \[1, K=4\].*max 5"):
        gpo(torch.randn(2, 4, 3), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="whole numbers"):
        gpo(torch.randn(2, 4, 3), torch.tensor([2.5, 1.0]))
    for pool in (gpo, MaxPool(), AvgPool(), KMaxPool(2)):  # used to be an OverflowError from int(inf)
        with pytest.raises(ValueError, match=r"lengths must hold finite whole numbers, got \[inf\]"):
            pool(torch.randn(2, 4, 3), torch.tensor([float("inf"), 1.0]))
    with pytest.raises(ValueError, match=r"features must be \(B, K, D\)"):
        gpo.pool(torch.randn(4, 3), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="KMaxPool needs an integer k >= 1"):
        KMaxPool(0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("lengths, error, match", [
    (torch.tensor([2.5, 2.0]), ValueError, r"finite whole numbers, got \[2.5\]"),
    (torch.tensor([float("nan"), 2.0]), ValueError, r"finite whole numbers, got \[nan\]"),
    (torch.tensor([0, 2]), ValueError, r"every length must be >= 1, got min 0"),
    (torch.tensor([True, True]), TypeError, r"integer or float tensor \(.*\), got torch.bool"),
    (torch.tensor([[2, 1]]), ValueError, r"lengths must be \(B,\)"),
    ([2, 1], TypeError, "lengths must be a torch.Tensor, got list"),
])
def test_compute_pool_weights_checks_lengths_as_forward_does(train, lengths, error, match):
    """The published public method: bad lengths are named, never truncated (2.5 -> 2) or left to an
    IndexError / pack_padded_sequence error; with features, K bounds them too."""
    gpo = GPO(4, 4).train(train)
    with torch.no_grad(), pytest.raises(error, match=match):
        gpo.compute_pool_weights(lengths)
    with pytest.raises(ValueError, match=r"in \[1, K=3\], got min 1, max 4"):
        gpo.compute_pool_weights(torch.tensor([4, 1]), torch.randn(2, 3, 5))
    weights, mask = gpo.compute_pool_weights(torch.tensor([3.0, 1.0]))
    assert weights.shape == mask.shape == (2, 3, 1)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compute_pool_weights_matches_published(train):
    """The published public method returns (weights, mask) with mask[b, p] = p < lengths[b]: the mask
    was compared with nothing, so a mask marking one padding position more went unseen."""
    published, ours = make_pair()
    ours.train(train)
    lengths, features = torch.tensor([3, 5, 1, 4]), torch.randn(4, 5, 6)
    with torch.no_grad():
        weights, mask = ours.compute_pool_weights(lengths, features)
        expected_weights, expected_mask = published.compute_pool_weights(lengths, features)
    assert mask.dtype == torch.bool and torch.equal(mask, expected_mask)
    assert weights.shape == expected_weights.shape and rel_err(weights, expected_weights) < 1e-5


def _direct_pools(features, lengths, k):
    """Direct torch definitions over the n valid rows of each sample."""
    rows = {"max": [], "avg": [], "kmax": []}
    for b, n in enumerate(lengths.tolist()):
        valid = features[b, :n]
        rows["max"].append(valid.max(0).values)
        rows["avg"].append(valid.mean(0))
        rows["kmax"].append(valid.topk(min(k, n), dim=0).values.mean(0))
    return {name: torch.stack(r) for name, r in rows.items()}


def test_fixed_pools_match_direct_definitions():
    B, K, D, k = 7, 10, 6, 3
    features, lengths = torch.randn(B, K, D, dtype=torch.float64), random_lengths(B, K)
    lengths[0] = 2  # fewer than k
    modules = {"max": MaxPool(), "avg": AvgPool(), "kmax": KMaxPool(k)}
    x_direct = features.clone().requires_grad_()
    direct = _direct_pools(x_direct, lengths, k)
    for name, module in modules.items():
        x = features.clone().requires_grad_()
        pooled, weights = module(x, lengths.float())
        assert weights.shape == (B, int(lengths.max()), 1)
        exact = dict(rtol=1e-12, atol=1e-12)  # float64 features: float64 weights (1/n, 1/k), not float32
        assert weights.dtype == torch.float64
        torch.testing.assert_close(pooled, direct[name], **exact)
        torch.testing.assert_close(module.pool(x, lengths), pooled, **exact)
        g = torch.randn(B, D, dtype=torch.float64)
        (grad,) = torch.autograd.grad(pooled, x, g)
        (expected,) = torch.autograd.grad(direct[name], x_direct, g)
        torch.testing.assert_close(grad, expected, **exact)
        assert module.coefficients(lengths, K).dtype == torch.float32  # the default


@pytest.mark.parametrize("K", [64, 65, 300])
def test_large_sets_on_the_cpu_build_only_the_sizes_present(K, monkeypatch):
    """A table over every size 1..K runs the GRU over K (K + 1) / 2 positions: a 1000-word caption took
    14 s (the published module 0.2 s), 4000 words 10 GB. Above ALL_SIZES_MAX_K the CPU builds the sizes
    present; the coefficients are the published ones either way, in train and eval mode."""
    import vse_fast.modules.gpo as gpo_module

    published, ours = make_pair()
    lengths = torch.tensor([K, 5, K - 17, 1])
    features = tie_free_features(4, K, 6)
    want = published(features, lengths)[0]
    all_sizes = gpo_module.GPO._table_over_all_sizes
    calls = []
    monkeypatch.setattr(gpo_module.GPO, "_table_over_all_sizes",
                        lambda self, size: calls.append(size) or all_sizes(self, size))
    close = dict(rtol=1e-5, atol=1e-6 * float(features.abs().max()))  # sums of up to K terms near 0
    for mode in (True, False):
        ours.train(mode)
        torch.testing.assert_close(ours.pool(features, lengths), want, **close)
        torch.testing.assert_close(ours(features, lengths)[0], want, **close)
    assert bool(calls) == (K <= gpo_module.ALL_SIZES_MAX_K)
    assert ours.pool(features[:0], lengths[:0]).shape == (0, 6)  # an empty batch (no sizes to build)


@pytest.mark.parametrize("K", [300, 600])
def test_the_eval_cache_keeps_a_table_over_every_size_up_to_512(K, monkeypatch):
    """In eval mode without gradients the table is built once and kept: cheaper than the sizes present
    batch after batch, up to CACHED_ALL_SIZES_MAX_K (0.7 s at K = 512); beyond, the sizes present."""
    import vse_fast.modules.gpo as gpo_module

    published, ours = make_pair()
    ours.eval()
    lengths = torch.tensor([K, 5, K - 17, 1])
    features = tie_free_features(4, K, 6)
    builds = ours.table_builds
    with torch.no_grad():
        want = published(features, lengths)[0]
        for _ in range(3):
            torch.testing.assert_close(ours.pool(features, lengths), want, rtol=1e-5,
                                       atol=1e-6 * float(features.abs().max()))
    assert ours.table_builds - builds == (1 if K <= gpo_module.CACHED_ALL_SIZES_MAX_K else 3)


def test_fixed_pools_with_infinite_values():
    """The max of [5, -inf, 1] is 5 and the top-2 mean 3: a weighted sum over every rank gave NaN
    (0 * -inf at the zero-weight ranks), and so did two fp16 values that overflowed to inf."""
    inf = float("inf")
    columns = [[5.0, -inf, 1.0], [inf, inf, 0.0], [1.0, 0.0, -inf]]  # one feature's set of 3 each
    x = torch.tensor(columns).T.reshape(1, 3, 3)
    n = torch.tensor([3])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        for module, want in ((MaxPool(), [5.0, inf, 1.0]), (KMaxPool(2), [3.0, inf, 0.5])):
            expected = torch.tensor([want], dtype=dtype)
            torch.testing.assert_close(module(xd, n)[0], expected)
            for backend in ("auto", "torch"):  # the encoders pass their gpo_backend
                torch.testing.assert_close(module.pool(xd, n, backend=backend), expected)
    nan_set = torch.tensor([[[1.0], [float("nan")], [inf]]])
    for module in (MaxPool(), KMaxPool(2), KMaxPool(5)):
        assert torch.isnan(module(nan_set, n)[0]).all()  # a NaN is not hidden


def test_fixed_pools_keep_padding_out_of_the_gradient():
    """A set whose valid values are all -inf: the padding (also -inf once masked) ranks after them."""
    x = torch.full((2, 4, 3), -float("inf"))
    x[0, 3] = 7.0  # padding of set 0 holds a large value
    x[1, 3] = 7.0  # set 1 is full
    x.requires_grad_()
    n = torch.tensor([2, 4])
    for module in (MaxPool(), KMaxPool(3)):
        pooled, _ = module(x, n)
        (grad,) = torch.autograd.grad(pooled.sum(), x)
        assert (grad[0, 2:] == 0).all() and pooled[0].eq(-float("inf")).all()
        assert grad[0, :2].sum() == 3  # one per feature
        torch.testing.assert_close(pooled[1], torch.full((3,), 7.0 if isinstance(module, MaxPool) else -float("inf")))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_parity_with_published(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the published GRU in true fp32
    published, ours = make_pair(device="cuda")
    B, K, D = 32, 36, 256
    lengths = random_lengths(B, K, "cuda").float()
    features = tie_free_features(B, K, D, "cuda").to(dtype)
    x_pub, x_ours = features.clone().requires_grad_(), features.clone().requires_grad_()
    pooled_pub, weights_pub = published(x_pub, lengths)
    pooled_ours, weights_ours = ours(x_ours, lengths)
    fast = ours.pool(features, lengths)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(weights_ours, weights_pub) < 1e-4
    assert rel_err(pooled_ours, pooled_pub) < tol and rel_err(fast, pooled_pub) < tol
    g = torch.randn(B, D, device="cuda")
    pooled_pub.backward(g.to(pooled_pub.dtype))
    pooled_ours.backward(g.to(pooled_ours.dtype))
    assert rel_err(x_ours.grad, x_pub.grad) < tol
    params_pub = dict(published.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, params_pub[name].grad) < (1e-3 if dtype == torch.float32 else 5e-2), name


def test_pool_under_autocast_computes_in_float32():
    """The published pool is elementwise (autocast leaves it alone); our torch path's bmm would run in
    bf16 under autocast (0.05 off before): both the module and the bare pool stay float32."""
    from vse_fast.ops.gpo_pool import gpo_pool

    published, ours = make_pair()
    features, lengths = torch.randn(5, 8, 64), random_lengths(5, 8)
    weights = torch.rand(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled, _ = ours(features, lengths)
        bare = gpo_pool(features, lengths, weights)
        mean = AvgPool()(features, lengths)[0]
    assert rel_err(pooled, published(features, lengths)[0]) < 1e-5
    assert rel_err(bare, gpo_pool(features.double(), lengths, weights.double())) < 1e-6
    assert rel_err(mean, AvgPool()(features.double(), lengths)[0]) < 1e-6


@pytest.mark.parametrize("table_backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_training_after_an_inference_mode_evaluation(table_backend):
    """vse_fast.eval encodes under torch.inference_mode; the position encodings cached there must
    not be inference tensors, which the next training step's backward cannot save."""
    torch.manual_seed(0)
    gpo = GPO(8, 8, table_backend=table_backend).eval()
    features, lengths = torch.randn(2, 5, 4), torch.tensor([5, 3])
    with torch.inference_mode():
        gpo(features, lengths)
    gpo.train()
    pooled, _ = gpo(features, lengths)
    pooled.sum().backward()
    assert gpo.gru.weight_ih_l0.grad is not None


def test_a_module_built_under_inference_mode_evaluates_uncached():
    """Inference tensors have no version counter: such a module is evaluated (as published), never cached."""
    published, reference = make_pair(8, 8)
    with torch.inference_mode():
        gpo = GPO(8, 8)
        gpo.load_state_dict(reference.state_dict())
        gpo.eval()
        features, lengths = torch.randn(3, 6, 5), random_lengths(3, 6)
        pooled, _ = gpo(features, lengths)
        gpo(features, lengths)
    assert gpo.table_builds == 2
    assert rel_err(pooled, published(features, lengths)[0]) < 1e-5


def test_eval_cache_sees_hooks_and_replacements_that_reuse_an_address():
    """A forward hook added after the table was cached applies; a parameter replaced by one that lands
    at the old one's address with the same version (glibc hands a freed > 32 MiB region straight back,
    the CUDA caching allocator any block) is still a new parameter: the cache keeps the tensors it
    was built from alive, so neither id nor storage can be reused."""
    published, ours = make_pair(8, 8)
    ours.eval()
    features, lengths = torch.randn(3, 6, 5), random_lengths(3, 6)
    with torch.no_grad():
        ours(features, lengths)
        handle = ours.linear.register_forward_hook(lambda module, args, out: out * 2)
        published.linear.register_forward_hook(lambda module, args, out: out * 2)
        assert rel_err(ours(features, lengths)[0], published(features, lengths)[0]) < 1e-5
        handle.remove()
        gpo = GPO(2, 2048).eval()  # weight_hh_l0 (6144, 2048) fp32: 48 MiB
        small_x = torch.randn(2, 3, 4)
        n = torch.tensor([3, 2])
        pointers = []
        for step in range(3):  # A (cached), B, C: C would land where A was, were A freed
            gpo.gru.weight_hh_l0 = torch.nn.Parameter(torch.randn(6144, 2048) * 0.02)
            pointers.append(gpo.gru.weight_hh_l0.data_ptr())
            if step == 0:
                gpo(small_x, n)
        cached = gpo(small_x, n)[0]
        gpo.clear_cache()
        assert torch.equal(cached, gpo(small_x, n)[0]) and gpo.table_builds == 3
        assert pointers[2] != pointers[0]


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn])
def test_lengths_of_dtypes_without_reductions_are_a_type_error(dtype):
    """They passed the dtype check, then failed inside min()/isfinite() with NotImplementedError."""
    lengths = torch.tensor([4, 2]).to(dtype)
    for module in (GPO(), AvgPool()):
        with pytest.raises(TypeError, match="lengths must be an integer or float tensor"):
            module(torch.randn(2, 4, 3), lengths)


@pytest.mark.parametrize("pool", [GPO(4, 4), AvgPool(), MaxPool()], ids=["gpo", "avg", "max"])
@pytest.mark.parametrize("lengths, match", [
    ([2.5, 3.0], r"finite whole numbers, got \[2.5\]"),
    ([float("nan"), 3.0], r"finite whole numbers, got \[nan\]"),
    ([0, 3], r"every length must be in \[1, K=3\], got min 0"),
    ([-3, 3], r"got min -3"),
    ([4, 3], r"got min 3, max 4"),
])
def test_pool_checks_lengths_on_the_cpu(pool, lengths, match):
    """The no-sync pool trusts its lengths on a GPU (a check would read them on the host), but on the
    CPU, where the torch path reads them there anyway, 2.5 was cut to 2 and 0, NaN, negative or > K
    lengths gave a zero or a clamped row, silently."""
    with pytest.raises(ValueError, match=match):
        pool.pool(torch.randn(2, 3, 5), torch.tensor(lengths))
