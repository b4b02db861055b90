"""AUTOMATIC1111's schedule types, samplers' defaults and combined names (ldm/models/diffusion/schedule_types.py),
and the k-diffusion schedules (k_schedules.py), against AUTOMATIC1111's and k-diffusion's numbers.

The known values below were produced by running AUTOMATIC1111's `modules/sd_schedulers.py` formulas (v1.10) and
k-diffusion's `get_sigmas_*` / `DiscreteSchedule` arithmetic, re-typed from their source into a scratch script
outside this repository, on the CPU (torch 2.13, numpy 2.4, scipy 1.17 for Beta's `stats.beta.ppf`), for Stable
Diffusion's schedule (scaled-linear betas 0.00085..0.012, 1000 steps, alphas_cumprod in float32). They are float32
numbers written exactly; ours must equal them bit for bit.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm.models.diffusion.k_schedules import (get_sigmas_exponential, get_sigmas_karras, get_sigmas_polyexponential,
                                              get_sigmas_vp)
from ldm.models.diffusion.schedule import NoiseSchedule
from ldm.models.diffusion.schedule_types import (A1111_SAMPLERS, AYS_SD1_SIGMAS, AYS_SDXL_SIGMAS, SCHEDULE_TYPES,
                                                 ScheduleOptions, a1111_sampler, a1111_sigmas,
                                                 available_schedule_types, beta_quantile, infotext_schedule_type,
                                                 resolve_schedule_type, schedule_type, split_sampler_and_schedule)
from ldm.modules.diffusionmodules.util import diffusion_schedule, make_beta_schedule

SIGMA_MIN, SIGMA_MAX = 0.02916753478348255, 14.614642143249512  # SD's sigmas[0] and sigmas[-1] in float32

# (schedule type, steps, ScheduleOptions fields) -> AUTOMATIC1111's sigmas
KNOWN = {
    ("Karras", 1, ()): [14.614643096923828, 0.0],
    ("Exponential", 1, ()): [14.614643096923828, 0.0],
    ("Polyexponential", 1, ()): [14.614643096923828, 0.0],
    ("Uniform", 1, ()): [14.614643096923828, 0.0],
    ("SGM Uniform", 1, ()): [14.614643096923828, 0.0],
    ("KL Optimal", 1, ()): [14.614632606506348, 0.02916753478348255],
    ("Simple", 1, ()): [14.614642143249512, 0.0],
    ("Normal", 1, ()): [14.614643096923828, 0.0],
    ("DDIM", 1, ()): [0.04131447896361351, 0.0],
    ("Beta", 1, ()): [14.614642143249512, 0.0],
    ("Align Your Steps", 1, ()): [0.028999999165534973, 0.0],
    ("Align Your Steps", 1, (("sdxl", True),)): [0.028999999165534973, 0.0],
    ("Karras", 10, ()): [14.614643096923828, 9.102933883666992, 5.478399276733398, 3.168609380722046,
        1.7494233846664429, 0.914076566696167, 0.44692087173461914, 0.20139983296394348, 0.08191107958555222,
        0.02916753850877285, 0.0],
    ("Exponential", 10, ()): [14.614643096923828, 7.324881553649902, 3.6712417602539062, 1.8400319814682007,
        0.9222267866134644, 0.46222159266471863, 0.23166616261005402, 0.11611143499612808, 0.05819522589445114,
        0.0291675366461277, 0.0],
    ("Polyexponential", 10, ()): [14.614643096923828, 7.324883460998535, 3.6712417602539062, 1.8400323390960693,
        0.9222270250320435, 0.46222159266471863, 0.23166616261005402, 0.11611143499612808, 0.05819522589445114,
        0.0291675366461277, 0.0],
    ("Uniform", 10, ()): [14.614643096923828, 7.839882850646973, 4.6091742515563965, 2.918307065963745,
        1.9501614570617676, 1.3449277877807617, 0.9323580265045166, 0.6249769330024719, 0.36865779757499695,
        0.0291675366461277, 0.0],
    ("SGM Uniform", 10, ()): [14.614643096923828, 8.307172775268555, 5.092407703399658, 3.325068950653076,
        2.2797305583953857, 1.6155803203582764, 1.1628645658493042, 0.8318837285041809, 0.5711889266967773,
        0.34370484948158264, 0.0],
    ("KL Optimal", 10, ()): [14.614632606506348, 4.565038204193115, 2.6328883171081543, 1.78644597530365,
        1.2947678565979004, 0.9615883827209473, 0.7116270661354065, 0.5094197392463684, 0.3356376886367798,
        0.17834684252738953, 0.02916753478348255],
    ("Simple", 10, ()): [14.614642143249512, 8.302803993225098, 5.087762832641602, 3.3210830688476562,
        2.276463031768799, 1.6128861904144287, 1.1605783700942993, 0.8298595547676086, 0.5692849159240723,
        0.341673880815506, 0.0],
    ("Normal", 10, ()): [14.614643096923828, 7.839882850646973, 4.6091742515563965, 2.918307065963745,
        1.9501614570617676, 1.3449277877807617, 0.9323580265045166, 0.6249769330024719, 0.36865779757499695,
        0.0291675366461277, 0.0],
    ("DDIM", 10, ()): [8.390685081481934, 5.134430885314941, 3.347763776779175, 2.292853832244873,
        1.623692274093628, 1.1682159900665283, 0.835652768611908, 0.5740503072738647, 0.3461867570877075,
        0.04131447896361351, 0.0],
    ("Beta", 10, ()): [14.614642143249512, 13.927785873413086, 12.490981101989746, 10.59760856628418,
        8.442437171936035, 6.201372146606445, 4.046201229095459, 2.1528286933898926, 0.7160240411758423,
        0.02916753478348255, 0.0],
    ("Align Your Steps", 10, ()): [14.614999771118164, 6.113513469696045, 3.5651137828826904, 2.393873453140259,
        1.6499555110931396, 1.1357873678207397, 0.7425183057785034, 0.44500744342803955, 0.16920512914657593,
        0.028999999165534973, 0.0],
    ("Align Your Steps", 10, (("sdxl", True),)): [14.614999771118164, 5.963397026062012, 3.3389651775360107,
        1.8550456762313843, 1.1023263931274414, 0.6749585866928101, 0.43114173412323, 0.2606205642223358,
        0.12251938879489899, 0.028999999165534973, 0.0],
    ("Karras", 10, (("rho", 3.0),)): [14.614641189575195, 10.756612777709961, 7.645383358001709, 5.200617790222168,
        3.3419835567474365, 1.989150047302246, 1.061784029006958, 0.47955289483070374, 0.16212494671344757,
        0.029167549684643745, 0.0],
    ("Polyexponential", 10, (("rho", 2.0),)): [14.614643096923828, 3.9641036987304688, 1.2536190748214722,
        0.46222159266471863, 0.19870039820671082, 0.09958893060684204, 0.05819522589445114, 0.03964857757091522,
        0.03149427846074104, 0.0291675366461277, 0.0],
    ("Align Your Steps", 11, ()): [14.614999771118164, 6.474999904632568, 3.8610000610351562, 2.697000026702881,
        1.8860000371932983, 1.3960000276565552, 0.9629999995231628, 0.6520000100135803, 0.39899998903274536,
        0.15199999511241913, 0.028999999165534973, 0.0],
    ("Align Your Steps", 11, (("sdxl", True),)): [14.614999771118164, 6.315000057220459, 3.7709999084472656,
        2.180999994277954, 1.3420000076293945, 0.8619999885559082, 0.5550000071525574, 0.3799999952316284,
        0.23399999737739563, 0.11299999803304672, 0.028999999165534973, 0.0],
    ("Align Your Steps", 20, ()): [14.614999771118164, 9.521713256835938, 6.301179885864258, 4.800018787384033,
        3.7179009914398193, 3.078136682510376, 2.548905372619629, 2.111524820327759, 1.770251989364624,
        1.5110145807266235, 1.266044020652771, 1.0412993431091309, 0.8514090776443481, 0.6934124231338501,
        0.5440924763679504, 0.4201678931713104, 0.2657647728919983, 0.1599200963973999, 0.06935113668441772,
        0.028999999165534973, 0.0],
    ("DDIM", 30, ()): [13.925848007202148, 11.476846694946289, 9.54358196258545, 8.004310607910156,
        6.768383026123047, 5.767772197723389, 4.951039791107178, 4.279000282287598, 3.721590280532837,
        3.255586862564087, 2.8629305362701416, 2.5294861793518066, 2.2441213130950928, 1.9980140924453735,
        1.7841312885284424, 1.5968308448791504, 1.4315603971481323, 1.2846211194992065, 1.152988076210022,
        1.0341665744781494, 0.9260792136192322, 0.8269732594490051, 0.7353426814079285, 0.6498563885688782,
        0.5692849159240723, 0.49240922927856445, 0.41787922382354736, 0.34393125772476196, 0.26765236258506775,
        0.18216602504253387, 0.04131447896361351, 0.0],
    ("Beta", 10, (("beta_alpha", 0.5), ("beta_beta", 0.7))): [14.614642143249512, 13.244050025939941,
        11.103281021118164, 8.733880996704102, 6.395260810852051, 4.267426490783691, 2.483725070953369,
        1.1422290802001953, 0.31073272228240967, 0.02916753478348255, 0.0],
}
# k-diffusion's get_sigmas_vp(10) (beta_d=19.9, beta_min=0.1, eps_s=1e-3)
KNOWN_VP_10 = [152.16697692871094, 53.309844970703125, 21.095617294311523, 9.403197288513184, 4.680639743804932,
               2.5494298934936523, 1.4619717597961426, 0.8228989839553833, 0.38170215487480164, 0.01048384327441454,
               0.0]
# AUTOMATIC1111's "DPM2" at 10 steps: Karras over 11 steps, the next-to-last sigma dropped
KNOWN_DPM2_10 = [14.614643096923828, 9.558268547058105, 6.082159519195557, 3.7512619495391846, 2.232161045074463,
                 1.2741049528121948, 0.6925739049911499, 0.35518476366996765, 0.16975796222686768, 0.07436362653970718,
                 0.0]


@pytest.fixture(scope="module")
def sd_schedule() -> NoiseSchedule:
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    return NoiseSchedule(torch.tensor(diffusion_schedule(betas)["alphas_cumprod"], dtype=torch.float32))


def test_reference_schedule_is_stable_diffusions(sd_schedule):
    assert (float(sd_schedule.sigmas[0]), float(sd_schedule.sigmas[-1])) == (SIGMA_MIN, SIGMA_MAX)


@pytest.mark.parametrize("label, steps, options", list(KNOWN),
                         ids=[f"{key[0]}-{key[1]}{dict(key[2]) or ''}" for key in KNOWN])
def test_schedule_types_give_automatic1111s_sigmas(sd_schedule, label, steps, options):
    sigmas = schedule_type(label)(steps, SIGMA_MIN, SIGMA_MAX, sd_schedule, "cpu", ScheduleOptions(**dict(options)))
    assert sigmas.dtype == torch.float32
    assert torch.equal(sigmas, torch.tensor(KNOWN[label, steps, options])), sigmas.tolist()


def test_schedule_type_edge_cases_are_automatic1111s():
    """KL Optimal ends at sigma_min (no 0); DDIM at 30 steps runs 31 (1000 // 30 = 33 apart); Align Your Steps uses
    its table as it is at 10 steps (11 sigmas) and ignores sigma_min / sigma_max."""
    assert KNOWN["KL Optimal", 10, ()][-1] == pytest.approx(SIGMA_MIN, rel=1e-6)
    assert len(KNOWN["DDIM", 30, ()]) == 32
    assert KNOWN["Align Your Steps", 11, ()] == [float(torch.tensor(s)) for s in (*AYS_SD1_SIGMAS, 0.0)]
    assert KNOWN["Align Your Steps", 11, (("sdxl", True),)] == [float(torch.tensor(s)) for s in (*AYS_SDXL_SIGMAS, 0.0)]
    # 20 steps interpolate log sigma linearly between the table's points: 19 intervals over its 10
    ays_20 = torch.tensor(KNOWN["Align Your Steps", 20, ()][:-1], dtype=torch.float64)
    table = torch.tensor(AYS_SD1_SIGMAS, dtype=torch.float64).log()
    positions = torch.linspace(0, 10, 20, dtype=torch.float64)
    low = positions.floor().long().clamp(max=9)
    expected = (table[low] + (positions - low) * (table[low + 1] - table[low])).exp()
    torch.testing.assert_close(ays_20, expected, rtol=1e-6, atol=0)


def test_k_diffusion_schedules_match_their_closed_forms():
    """Karras et al. (2022) eq. (5), log-linear, polynomial in log sigma, and the VP SDE, in float64 (float32
    rounding apart)."""
    n, rho = 12, 7.0
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    karras = (SIGMA_MAX ** (1 / rho) + ramp * (SIGMA_MIN ** (1 / rho) - SIGMA_MAX ** (1 / rho))) ** rho
    torch.testing.assert_close(get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX)[:-1].double(), karras, rtol=2e-6, atol=0)
    exponential = torch.exp(torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), n, dtype=torch.float64))
    torch.testing.assert_close(get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX)[:-1].double(), exponential,
                               rtol=2e-6, atol=0)
    poly = torch.exp((1 - ramp) ** 2 * (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) + math.log(SIGMA_MIN))
    torch.testing.assert_close(get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=2.0)[:-1].double(), poly,
                               rtol=2e-6, atol=0)
    t = torch.linspace(1, 1e-3, n, dtype=torch.float64)
    vp = torch.sqrt(torch.exp(19.9 * t**2 / 2 + 0.1 * t) - 1)
    # float32 exp(x) - 1 cancels at the small end: k-diffusion's last sigma is only 3e-6 close
    torch.testing.assert_close(get_sigmas_vp(n)[:-1].double(), vp, rtol=2e-6, atol=3e-6)
    assert torch.equal(get_sigmas_vp(10), torch.tensor(KNOWN_VP_10))
    for sigmas in (get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX), get_sigmas_vp(n)):
        assert sigmas[-1] == 0 and sigmas.shape == (n + 1,)


def test_float64_karras_of_the_samplers_is_unchanged(sd_schedule):
    """With a dtype, get_sigmas_karras keeps its float64 ramp (NoiseSchedule.get_sigmas_karras, the `_karras`
    sampler names, whose images must not change); without, it is k-diffusion's float32 arithmetic."""
    ramp = torch.linspace(0, 1, 20, dtype=torch.float64)
    low, high = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
    float64_ramp = torch.cat([(high + ramp * (low - high)) ** 7, torch.zeros(1, dtype=torch.float64)]).float()
    assert torch.equal(sd_schedule.get_sigmas_karras(20), float64_ramp)
    assert torch.equal(get_sigmas_karras(20, SIGMA_MIN, SIGMA_MAX, dtype=torch.float32), float64_ramp)
    assert torch.equal(get_sigmas_karras(20, sd_schedule.sigma_min, sd_schedule.sigma_max),
                       schedule_type("karras")(20, SIGMA_MIN, SIGMA_MAX))


def test_automatic_is_each_samplers_default(sd_schedule):
    karras_20 = schedule_type("Karras")(20, SIGMA_MIN, SIGMA_MAX)
    assert torch.equal(a1111_sigmas("DPM++ 2M", 20, sd_schedule), karras_20)
    assert torch.equal(a1111_sigmas("DPM++ 2M", 20, sd_schedule, "Automatic"), karras_20)
    assert torch.equal(a1111_sigmas("DPM++ 2M Karras", 20, sd_schedule), karras_20)  # an old combined name
    assert torch.equal(a1111_sigmas("Euler", 20, sd_schedule),  # no default: the model's own, k-diffusion's
                       schedule_type("Uniform")(20, SIGMA_MIN, SIGMA_MAX, sd_schedule))
    assert torch.equal(a1111_sigmas("DPM++ 2M SDE", 10, sd_schedule),
                       schedule_type("Exponential")(10, SIGMA_MIN, SIGMA_MAX))
    assert torch.equal(a1111_sigmas("Euler a", 10, sd_schedule, "Beta"), torch.tensor(KNOWN["Beta", 10, ()]))
    # DPM2, DPM2 a and DPM++ 3M SDE run one more sigma and drop the next-to-last
    assert torch.equal(a1111_sigmas("DPM2", 10, sd_schedule), torch.tensor(KNOWN_DPM2_10))
    assert torch.equal(a1111_sigmas("Euler", 10, sd_schedule, "Karras", discard_penultimate=True),
                       torch.tensor(KNOWN_DPM2_10))
    dpm3m = a1111_sigmas("DPM++ 3M SDE", 10, sd_schedule)
    exponential_11 = schedule_type("Exponential")(11, SIGMA_MIN, SIGMA_MAX)
    assert torch.equal(dpm3m, torch.cat([exponential_11[:-2], exponential_11[-1:]]))
    # a combined name's schedule type wins over the requested one, as in AUTOMATIC1111
    assert torch.equal(a1111_sigmas("DPM++ 2M Karras", 20, sd_schedule, "Exponential"), karras_20)
    with pytest.raises(ValueError, match="takes no schedule type"):
        a1111_sigmas("DDIM", 20, sd_schedule)


def test_infotext_schedule_type():
    assert infotext_schedule_type("DPM++ 2M") == "Karras"
    assert infotext_schedule_type("DPM++ 2M", "Uniform") == "Uniform"
    assert infotext_schedule_type("Euler a") == "Automatic"
    assert infotext_schedule_type("DPM++ 2M SDE Heun", "automatic") == "Exponential"
    assert resolve_schedule_type("euler_a_karras").label == "Karras"


@pytest.mark.parametrize("name, expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
    ("DPM++ 2M SDE Heun Karras", ("DPM++ 2M SDE Heun", "Karras")),
    ("DPM2 a Karras", ("DPM2 a", "Karras")),
    ("dpmpp_2m_karras", ("dpmpp_2m", "Karras")),
    ("euler-a-exponential", ("euler-a", "Exponential")),
    ("Euler SGM Uniform", ("Euler", "SGM Uniform")),
    ("Euler sgm_uniform", ("Euler", "SGM Uniform")),
    ("Euler Align Your Steps", ("Euler", "Align Your Steps")),
    ("DPM++ 2M SDE Heun", ("DPM++ 2M SDE Heun", None)),
    ("Euler a", ("Euler a", None)),
    ("DDIM", ("DDIM", None)),
    ("Karras", ("Karras", None)),
])
def test_split_sampler_and_schedule(name, expected):
    assert split_sampler_and_schedule(name) == expected


def test_sampler_table_is_automatic1111s():
    """AUTOMATIC1111 v1.10's samplers_k_diffusion / samplers_timesteps / samplers_lcm options, transcribed."""
    by_label = {entry.label: entry for entry in A1111_SAMPLERS}
    defaults = {label: entry.default_schedule for label, entry in by_label.items() if entry.default_schedule}
    assert defaults == {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential",
                        "DPM++ 2M SDE Heun": "exponential", "DPM++ 2S a": "karras", "DPM++ 3M SDE": "exponential",
                        "DPM2": "karras", "DPM2 a": "karras", "Restart": "karras"}
    flags = {flag: {label for label, entry in by_label.items() if getattr(entry, flag)}
             for flag in ("discard_next_to_last_sigma", "uses_ensd", "second_order", "brownian_noise")}
    assert flags == {
        "discard_next_to_last_sigma": {"DPM2", "DPM2 a", "DPM++ 3M SDE"},
        "uses_ensd": {"DPM++ 2S a", "Euler a", "DPM2 a", "DPM fast", "DPM adaptive"},
        "second_order": {"DPM++ SDE", "DPM++ 2S a", "Heun", "DPM2", "DPM2 a", "Restart"},
        "brownian_noise": {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"},
    }
    assert by_label["DPM++ 2M SDE Heun"].solver_type == "heun"
    assert {label for label, entry in by_label.items() if entry.function_name is None} == {
        "DDIM", "DDIM CFG++", "PLMS", "UniPC"}
    assert len({spelling for entry in A1111_SAMPLERS for spelling in (entry.label, *entry.aliases)}) == sum(
        1 + len(entry.aliases) for entry in A1111_SAMPLERS)


@pytest.mark.parametrize("name, label", [("DPM++ 2M", "DPM++ 2M"), ("dpmpp_2m", "DPM++ 2M"),
                                         ("k_dpmpp_2m", "DPM++ 2M"), ("euler a", "Euler a"),
                                         ("DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun"), ("ddim_cfgpp", "DDIM CFG++"),
                                         ("DPM++ SDE Karras", "DPM++ SDE"), ("k_dpm_ad", "DPM adaptive")])
def test_a1111_sampler_lookup(name, label):
    assert a1111_sampler(name).label == label


def test_lookups_refuse_unknown_names():
    with pytest.raises(ValueError, match="Align Your Steps"):
        schedule_type("linear quadratic")
    with pytest.raises(ValueError, match="DPM\\+\\+ 2M"):
        a1111_sampler("Euler b")


def test_schedule_type_names_and_refusals(sd_schedule):
    assert available_schedule_types() == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential",
                                          "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM",
                                          "Beta"]
    assert len(SCHEDULE_TYPES) == 12
    for spelling in ("SGM Uniform", "sgm_uniform", "SGMUniform", "sgm-uniform"):
        assert schedule_type(spelling).name == "sgm_uniform"
    with pytest.raises(ValueError, match="sampler's default"):
        schedule_type("Automatic")(10, SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError, match="NoiseSchedule"):
        schedule_type("Normal")(10, SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError, match="at least one step"):
        schedule_type("Karras")(0, SIGMA_MIN, SIGMA_MAX)


def test_records_ensd():
    assert a1111_sampler("Euler a").records_ensd(31337)
    assert not a1111_sampler("Euler a").records_ensd(31337, eta=0)
    assert not a1111_sampler("Euler a").records_ensd(0)
    assert not a1111_sampler("DPM++ 2M").records_ensd(31337)
    assert not a1111_sampler("DPM++ SDE").records_ensd(31337)  # its noise is the Brownian tree's


@pytest.mark.parametrize("a, b", [(0.6, 0.6), (1.0, 1.0), (2.0, 1.0), (1.0, 3.0), (0.5, 0.5), (0.5, 0.7)])
def test_beta_quantile_closed_forms(a, b):
    """Beta(1, 1) is uniform; Beta(a, 1) has quantile p^(1/a), Beta(1, b) 1 - (1 - p)^(1/b), Beta(1/2, 1/2)
    (the arcsine distribution) sin^2(pi p / 2); any Beta is symmetric: Q(p; a, b) = 1 - Q(1 - p; b, a)."""
    assert (beta_quantile(0.0, a, b), beta_quantile(1.0, a, b)) == (0.0, 1.0)
    for p in [1e-6, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]:
        quantile = beta_quantile(p, a, b)
        if (a, b) == (1.0, 1.0):
            assert quantile == pytest.approx(p, rel=1e-14)
        elif b == 1.0:
            assert quantile == pytest.approx(p ** (1 / a), rel=1e-14)
        elif a == 1.0:
            assert quantile == pytest.approx(-math.expm1(math.log1p(-p) / b), rel=1e-13)
        elif (a, b) == (0.5, 0.5):
            assert quantile == pytest.approx(math.sin(math.pi * p / 2) ** 2, rel=1e-13)
        # 1 - x loses the low digits of quantiles near 1, hence the absolute tolerance
        assert quantile == pytest.approx(1 - beta_quantile(1 - p, b, a), rel=1e-13, abs=1e-12)


def test_beta_quantile_is_scipys():
    stats = pytest.importorskip("scipy.stats")
    for a in (0.01, 0.1, 0.6, 1.0, 3.0):
        for b in (0.05, 0.6, 1.0, 2.5):
            for p in [index / 20 for index in range(21)]:
                assert beta_quantile(p, a, b) == pytest.approx(float(stats.beta.ppf(p, a, b)), rel=2e-12,
                                                               abs=1e-300)
    with pytest.raises(ValueError, match="alpha > 0"):
        beta_quantile(0.5, 0.0, 1.0)
