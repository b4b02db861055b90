"""The new and changed k-diffusion samplers against numbers made by k-diffusion's own code (and AUTOMATIC1111's for
LCM, Restart and DDIM CFG++), on the same toy model, conditioning, starting noise, step noise and Brownian trees.

How REFERENCE was made (the script is not in the repository): k-diffusion's `k_diffusion/sampling.py` and
`external.py` (crowsonkb/k-diffusion 4601bf0, the same two files as the commit AUTOMATIC1111 1.10 pins) copied alone
into a scratch package outside the repository, with `utils` stubbed by its `append_dims` and `torchdiffeq` by an
empty `odeint`, run with torch 2.13 (CPU, one thread), torchsde 0.2.6 and scipy on tests/toy_diffusion.py's
`NonlinearToyDiffusion`:
- model: `k_diffusion.external.CompVisDenoiser(toy, quantize=False)` under AUTOMATIC1111's guidance on denoised
  estimates, uncond + (cond - uncond) * 5 in one batch; conditioning and starting noise as `conditioning()` and
  `unit_noise()` below; sigmas its `get_sigmas(10)` and `get_sigmas_karras(10, sigma_min, sigma_max)` (recorded);
- ancestral and DPM-Solver noise: `stream([21, 22])` below; SDE samplers: `BrownianTreeNoiseSampler(x, min positive
  sigma, max sigma, seed=[5, 6])`; DPM fast / adaptive over (sigma_min, sigma_max) of the model, fast with n = 10;
- LCM, Restart and DDIM CFG++: AUTOMATIC1111 1.10's `LCMCompVisDenoiser` + `sample_lcm` (4 steps of its own
  schedule, scale 1.5), `restart_sampler` (Karras sigmas of 10, 20 and 36 steps; its `randn_like` drawn from
  `stream([21, 22])`) and `ddim_cfgpp` (its timesteps, scale 5 / 12.5, step noise continuing the starting noise's
  per-image generators), on the toy's `apply_model`;
- Euler CFG++ (ComfyUI's `sample_euler_cfg_pp` and its ancestral twin, scale 0.8): x = denoised + sigma' d_uncond;
- "unet/...": the tiny SD 1.x model of tests/configs/tiny-v1.yaml with `random_state_dict(..., 0)` weights through
  k-diffusion's `CompVisDenoiser` (fractional timesteps into the real timestep embedding), contexts `contexts()`,
  starting and step noise continuing per-image generators seeded 11 and 12, Brownian trees seeded 11 and 12: what
  the sampler registry does for seeds 11 and 12.
Each entry is out.flatten()[::37] and out.abs().mean(). Our results must agree to a relative error below 1e-5 of
the largest reference value.
"""
from __future__ import annotations

import math

import pytest
import torch

from omegaconf import OmegaConf

from checkpoint_factory import TEST_CONFIGS, random_state_dict
from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.k_denoisers import CompVisDenoiser, LCMCompVisDenoiser
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import resolve_sampler, sample, sample_img2img
from ldm.util import instantiate_from_config
from toy_diffusion import ContinuousGaussianData, NonlinearToyDiffusion

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (2, 4, 8, 8)
SEEDS = [11, 12]
SCALE = 5.0
STEPS = 10

REFERENCE = {
    'sigmas_model': [
        14.6146431, 7.83988285, 4.60917425, 2.91830707, 1.95016146, 1.34492779, 0.932358027, 0.624976933, 0.368657798,
        0.0291675366, 0
    ],
    'sigmas_karras': [
        14.6146431, 9.10293388, 5.47839928, 3.16860938, 1.74942338, 0.914076567, 0.446920872, 0.201399833,
        0.0819110796, 0.0291675385, 0
    ],
    'euler/model': [
        14.718051, 14.1048279, 14.8207197, 14.1930933, 15.8683014, 5.03194523, -3.38334441, -21.2790508, -23.4580898,
        -14.6025229, -19.3073215, 16.650753, 0.252247453, -7.34392166, 14.0728951
    ],
    'euler_a/model': [
        23.583168, 30.4864998, 24.9324093, 18.2756138, 16.9687614, 12.9893789, -12.6593418, -21.6111202, -34.7303772,
        -21.2970276, -11.701849, 22.8252335, -2.56191397, -15.4019194, 16.8646984
    ],
    'heun/model': [
        14.7863684, 13.6039925, 11.8631849, 18.4594383, 18.2473927, 6.84698248, -3.03315949, -19.7420254, -21.8530273,
        -13.9896069, -18.4528637, 17.0068836, 0.351089507, -6.7503109, 13.4735174
    ],
    'dpm2/model': [
        15.6056957, 14.7865973, 10.5257521, 18.3737049, 18.242794, 6.88874197, -3.018543, -19.8729992, -21.9794502,
        -14.0644913, -18.5478668, 16.9922256, 0.325223356, -6.78774023, 13.6932564
    ],
    'dpm2_a/model': [
        22.4638691, 27.4361095, 16.5351696, 23.1722698, 21.492197, 16.6630173, -9.0800705, -17.0083923, -29.4079704,
        -18.7932949, -10.0693989, 23.8292141, 1.0414331, -12.860363, 14.9157257
    ],
    'lms/model': [
        14.3421297, 13.6034212, 14.0219955, 14.6000166, 16.2891769, 5.60544968, -3.25416231, -20.6651173, -22.8277969,
        -14.3172703, -18.9247017, 16.7406197, 0.437371641, -7.05560017, 13.7076187
    ],
    'dpmpp_2s_a/model': [
        22.4707718, 28.4802551, 20.0092659, 20.9679241, 19.7795696, 15.0394545, -18.4066143, -18.80299, -31.4385567,
        -19.6960831, -10.7038717, 23.2951717, -0.424235761, -13.6777363, 15.4698429
    ],
    'dpmpp_2m/model': [
        14.4083719, 13.4887085, 13.0670271, 15.4838238, 16.7320061, 5.97544479, -3.11518407, -20.0877304, -22.2237244,
        -14.0376892, -18.5492897, 16.7366772, 0.633459091, -6.78528214, 13.4434566
    ],
    'dpmpp_sde/model': [
        20.8866863, 25.5269241, 32.9311409, 23.872982, 20.3345852, -5.68384981, 0.535952508, -27.1510201, -31.2899132,
        -19.4718838, -16.7869816, 23.551796, 16.7283039, -27.2786522, 18.0149574
    ],
    'dpmpp_2m_sde/model': [
        18.4315147, 23.3147488, 30.3427181, 21.5946121, 18.2984161, -3.18068552, 3.04693794, -26.7401333, -31.7132282,
        -16.8469963, -15.8956318, 21.2747993, 13.9004374, -24.0802555, 16.3133278
    ],
    'dpmpp_2m_sde_heun/model': [
        16.9290085, 22.970335, 29.2417068, 20.1770458, 16.9249001, -3.03998661, 4.69413662, -26.1758862, -30.8588028,
        -16.1724586, -14.4083157, 20.0545864, 16.0388145, -20.7751083, 15.7462254
    ],
    'dpmpp_3m_sde/model': [
        30.3209419, 22.7426491, 37.8831596, 18.5291843, 20.3649464, 0.714467525, -3.36134386, -29.0781441,
        -35.5117378, -19.1705074, -14.7709322, 22.4867592, 19.7265453, -22.7139378, 17.2239227
    ],
    'dpmpp_3m_sde_eta_half/model': [
        23.3814907, 17.5335121, 32.6133347, 18.8863239, 19.3711376, 0.301590979, -11.8186836, -26.2754555,
        -31.4200993, -17.7318954, -15.6049404, 22.0096722, 11.5814018, -18.0144272, 15.8929625
    ],
    'euler/karras': [
        15.5388899, 14.9062777, 14.1626625, 15.3079748, 16.3746853, 5.10922241, -3.37428164, -21.4355354, -23.5867233,
        -14.7157249, -19.4470406, 16.6388187, 0.119256675, -7.3797226, 14.291832
    ],
    'euler_a/karras': [
        26.5266972, 32.2731552, 24.7949409, 19.0234051, 17.2967472, 13.9593801, -12.8771381, -22.1878815, -35.9449844,
        -22.7178116, -10.5604315, 22.846138, -3.16275144, -15.8227072, 17.624052
    ],
    'heun/karras': [
        14.7903481, 13.8342171, 11.5965443, 18.1488266, 18.0512352, 6.84739304, -3.03245187, -19.7296066, -21.8529224,
        -13.9691095, -18.4287682, 17.0085258, 0.398864627, -6.75338936, 13.4712315
    ],
    'dpm2/karras': [
        15.1973572, 14.3632517, 10.8134146, 19.2227859, 18.1775684, 6.8923173, -3.03041005, -19.8334179, -21.9491196,
        -14.0380316, -18.5147076, 17.0152969, 0.339357615, -6.78322411, 13.6164408
    ],
    'dpm2_a/karras': [
        23.2294178, 27.0950375, 16.7657108, 20.0445442, 17.9152374, 16.9178181, -6.01390123, -17.2825813, -29.7516499,
        -19.3920326, -8.89583302, 23.4814243, 0.97047925, -13.0744381, 14.706171
    ],
    'lms/karras': [
        14.869709, 14.110981, 13.1033516, 15.8176165, 17.0290642, 6.017344, -3.20561457, -20.5861492, -22.7179623,
        -14.3321962, -18.9295483, 16.8453579, 0.348899424, -6.98953915, 13.8049984
    ],
    'dpmpp_2s_a/karras': [
        24.6039371, 29.4160423, 19.7191467, 21.2009048, 19.6931114, 15.8768892, -15.4230795, -19.2972908, -32.3088646,
        -20.7982349, -9.58382797, 23.2717876, -0.775841236, -14.0351505, 15.9254379
    ],
    'dpmpp_2m/karras': [
        14.9065809, 13.9138823, 11.7327576, 17.0371094, 17.9268742, 6.88430309, -3.03543234, -19.875206, -21.9527435,
        -14.0267992, -18.5098209, 17.0472908, 0.500478566, -6.64860821, 13.517911
    ],
    'dpmpp_sde/karras': [
        25.5091076, 25.7898846, 33.5207062, 24.1259689, 23.0105228, -5.2744422, -4.38009882, -27.9985561, -33.6709366,
        -15.869585, -8.48344707, 23.8885002, 18.3178825, -21.9731388, 18.3374596
    ],
    'dpmpp_2m_sde/karras': [
        23.3768234, 26.0278606, 33.6579819, 28.3770256, 23.075285, -4.49444246, 4.11178637, -28.0832214, -34.0142136,
        -18.4550877, -16.3398876, 22.0327568, 16.5273914, -17.4813004, 17.9967537
    ],
    'dpmpp_2m_sde_heun/karras': [
        23.6988564, 26.6141453, 33.8214264, 29.7766018, 24.1248226, -4.41929865, 6.02717876, -28.0067425, -33.6623993,
        -18.4165668, -12.9934692, 21.7073708, 18.2918549, -14.8442144, 18.0073204
    ],
    'dpmpp_3m_sde/karras': [
        21.0023422, 23.4830608, 30.2953148, 21.3354759, 19.9392204, -3.19010639, 3.9090538, -26.4213734, -31.3329678,
        -17.4188156, -13.9464846, 19.4536591, 12.4851294, -18.8241119, 15.9815216
    ],
    'dpmpp_3m_sde_eta_half/karras': [
        18.4588947, 18.8080425, 26.7141666, 19.5270405, 19.7949505, -2.00143862, -2.07560444, -24.4642429,
        -29.7904892, -16.1554241, -17.076807, 20.9775085, 8.70702744, -18.9641037, 15.2601633
    ],
    'dpm_fast': [
        14.4006081, 12.7764645, 13.2415419, 18.2393742, 19.1587772, 7.10752487, -3.08136916, -19.8193035, -21.9878597,
        -14.00669, -18.4898586, 16.9494324, 0.181347638, -6.85410643, 13.4214144
    ],
    'dpm_fast_eta1': [
        9.80259895, 13.4978285, 16.1668301, 6.72998762, 9.64359665, 11.5656567, -5.92761946, -16.8264732, -23.0819626,
        -15.0925398, -12.3053007, 17.8076591, -1.06470156, -10.4348469, 11.5588207
    ],
    'dpm_adaptive': [
        15.0960951, 14.2572041, 11.3094482, 19.5255165, 18.1262798, 6.60745287, -3.06015515, -19.9942951, -22.1410942,
        -14.104495, -18.6143589, 16.9669189, 0.264816225, -6.87915421, 13.6949272
    ],
    'dpm_adaptive_info': {'steps': 10, 'nfe': 30, 'n_accept': 10, 'n_reject': 0},
    'dpm_adaptive_eta1': [
        21.5415249, 34.2812538, 25.7081985, 31.4406261, 20.6319313, 15.1819811, -18.8124352, -19.3222256, -33.1066818,
        -15.392127, -7.0307765, 22.7562008, -5.12893867, -15.0860262, 16.6326542
    ],
    'dpm_adaptive_eta1_info': {'steps': 16, 'nfe': 48, 'n_accept': 13, 'n_reject': 3},
    'lcm_sigmas': [
        14.6146431, 2.99105597, 0.972825944, 0.13445057, 0
    ],
    'lcm': [
        -1.19189954, 2.95371771, 15.0960875, -6.99444866, 7.95569563, 1.19864345, -7.29260015, -12.0466213,
        -27.6259422, -20.3789864, -17.517395, 12.8262615, -9.74337101, -7.91568661, 13.3112907
    ],
    'restart_sigmas_10': [
        14.6146431, 9.10293388, 5.47839928, 3.16860938, 1.74942338, 0.914076567, 0.446920872, 0.201399833,
        0.0819110796, 0.0291675385, 0
    ],
    'restart_10': [
        14.7903481, 13.8342171, 11.5965443, 18.1488266, 18.0512352, 6.84739304, -3.03245187, -19.7296066, -21.8529224,
        -13.9691095, -18.4287682, 17.0085258, 0.398864627, -6.75338936, 13.4712315
    ],
    'restart_10_plan_length': 10,
    'restart_sigmas_20': [
        14.6146431, 11.7253685, 9.34020805, 7.38362741, 5.78942108, 4.4998436, 3.46475458, 2.64084673, 1.99092078,
        1.48321688, 1.09079063, 0.790949464, 0.564724624, 0.396392286, 0.273039758, 0.184169367, 0.121342458,
        0.0778608099, 0.0484819002, 0.0291675385, 0
    ],
    'restart_20': [
        14.3661175, 15.7348261, 12.1902828, 16.09972, 17.0274773, 10.099246, -5.31655788, -19.2522907, -22.5825787,
        -14.1343346, -14.4813576, 18.0353584, 0.933036029, -8.91880322, 12.8125648
    ],
    'restart_20_plan_length': 20,
    'restart_sigmas_36': [
        14.6146431, 12.9787045, 11.5023146, 10.1722775, 8.97630405, 7.90294361, 6.94152737, 6.08215952, 5.31564188,
        4.63346338, 4.02774382, 3.49120736, 3.01713443, 2.59934783, 2.23216105, 1.91036212, 1.62917709, 1.38423908,
        1.17156959, 0.987542927, 0.828871548, 0.692573905, 0.575956345, 0.476592064, 0.392298907, 0.321121693,
        0.261313498, 0.211319074, 0.169757962, 0.135409698, 0.107199371, 0.0841844156, 0.0655416399, 0.0505557545,
        0.038608294, 0.0291675385, 0
    ],
    'restart_36': [
        14.6755686, 18.7477226, 13.4266834, 17.5907631, 17.8118649, 12.3318186, -7.85269022, -13.5892124, -23.0423985,
        -18.0596542, -12.7130537, 15.8759079, -0.348732531, -11.1956511, 12.3712292
    ],
    'restart_36_plan_length': 36,
    'ddim_cfg_pp_10_0.0': [
        -0.275794238, -0.358013809, 5.9437294, -1.48461521, 6.77117968, -0.0383098461, -1.62967229, -5.92069006,
        -12.1195316, -8.76928902, -11.6000614, 8.63755512, -3.05470157, -1.23401451, 6.7726903
    ],
    'ddim_cfg_pp_10_1.0': [
        -7.95399094, -1.30997443, -0.98754555, 0.720504701, 4.83089304, -3.20546532, -3.58295894, -12.583353,
        -15.8447065, -2.9157331, -9.97163677, 7.88554096, -5.28326988, -5.30102682, 8.10324192
    ],
    'ddim_cfg_pp_30_0.0': [
        5.51951075, 5.04391098, 10.2296038, 7.92172384, 13.1504469, 2.44724512, -2.72623301, -15.9514885, -20.2289314,
        -13.7824545, -18.1936588, 14.8400869, -3.45432162, -3.93343949, 11.3242207
    ],
    'euler_cfg_pp': [
        1.74809611, 1.50115824, 10.7248697, 1.91385424, 11.5867157, 0.493035972, -2.9882834, -13.2946348, -21.2190552,
        -14.8104353, -19.5484962, 14.3097839, -5.02624893, -3.43155479, 11.6823282
    ],
    'euler_ancestral_cfg_pp': [
        3.29206157, 12.3117533, 18.3917713, -6.77294016, 9.15666389, 6.86378193, -11.8979378, -2.63411903,
        -31.5745716, -21.5981293, -12.0191936, 17.8824329, -12.993515, -10.4677038, 12.9022446
    ],
    'unet_sigmas/euler': [
        14.6146431, 5.94889927, 2.91830707, 1.61558032, 0.932358027, 0.493551701, 0.0291675366, 0
    ],
    'unet/euler': [
        -34.2312241, 44.2272034, -70.2683792, -1.36070883, 24.4027004, 9.19231796, -10.4156284, 15.21597, -24.4426918,
        -21.7959881, -30.7457371, 7.67661333, 0.291643232, 79.3645477, 25.4908371
    ],
    'unet_sigmas/euler_a': [
        14.6146431, 5.94889927, 2.91830707, 1.61558032, 0.932358027, 0.493551701, 0.0291675366, 0
    ],
    'unet/euler_a': [
        -48.9499664, 63.5539474, -107.137909, -8.62749386, 30.8022919, 5.09634209, -10.2928524, 20.5526161,
        -35.7750092, -31.4185429, -37.0555534, 8.30493736, -11.9748659, 101.231621, 34.1180992
    ],
    'unet_sigmas/dpm2_karras': [
        14.6146431, 4.79654408, 1.27410495, 0.247951746, 0.0291675385, 0
    ],
    'unet/dpm2_karras': [
        -12.9738188, 38.3854294, -48.6552086, 27.3460827, 6.68413448, 2.28955889, -7.08654737, -4.31227922,
        11.2421589, -48.2938423, -46.4705009, 0.802154303, 21.8915195, 71.0768509, 23.6159439
    ],
    'unet_sigmas/dpmpp_2m_sde': [
        14.6146431, 5.94889927, 2.91830707, 1.61558032, 0.932358027, 0.493551701, 0.0291675366, 0
    ],
    'unet/dpmpp_2m_sde': [
        -43.0704575, 53.5418663, -90.896225, -8.43583775, 22.0054798, 31.7705593, -22.0042629, 46.4201317,
        -23.4872952, -32.296196, -53.3495636, 6.07914209, -19.9101219, 83.0482941, 34.532547
    ],
}


def conditioning() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g) * 0.1


def unit_noise(seeds: list[int]) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return torch.stack([torch.randn(SHAPE[1:], generator=g) for g in generators])


def stream(seeds: list[int]):
    """Per-image generators, one draw per image per call."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return lambda sigma, sigma_next: torch.stack([torch.randn(SHAPE[1:], generator=g) for g in generators])


def assert_matches(out: torch.Tensor, key: str) -> None:
    reference = torch.tensor(REFERENCE[key], dtype=torch.float64)
    ours = torch.tensor([*out.flatten()[::37].tolist(), float(out.abs().mean())], dtype=torch.float64)
    error = float((ours - reference).abs().max() / reference.abs().max())
    assert error < 1e-5, (key, error)


def recorded_sigmas(key: str) -> torch.Tensor:
    return torch.tensor(REFERENCE[key], dtype=torch.float32)


@pytest.fixture(scope="module")
def toy() -> NonlinearToyDiffusion:
    return NonlinearToyDiffusion()


@pytest.fixture(scope="module")
def guided():
    cond, uncond = conditioning()
    return {"cond": cond, "uncond": uncond, "cond_scale": SCALE}


def brownian(x: torch.Tensor, sigmas: torch.Tensor) -> k_sampling.BrownianTreeNoiseSampler:
    return k_sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[5, 6])


def test_the_model_schedule_is_k_diffusions_to_the_bit(toy):
    assert torch.equal(CompVisDenoiser(toy).get_sigmas(STEPS), recorded_sigmas("sigmas_model"))


RUNS = {
    "euler": lambda x, s: (k_sampling.sample_euler, {}),
    "euler_a": lambda x, s: (k_sampling.sample_euler_ancestral, {"noise_sampler": stream([21, 22])}),
    "heun": lambda x, s: (k_sampling.sample_heun, {}),
    "dpm2": lambda x, s: (k_sampling.sample_dpm_2, {}),
    "dpm2_a": lambda x, s: (k_sampling.sample_dpm_2_ancestral, {"noise_sampler": stream([21, 22])}),
    "lms": lambda x, s: (k_sampling.sample_lms, {}),
    "dpmpp_2s_a": lambda x, s: (k_sampling.sample_dpmpp_2s_ancestral, {"noise_sampler": stream([21, 22])}),
    "dpmpp_2m": lambda x, s: (k_sampling.sample_dpmpp_2m, {}),
    "dpmpp_sde": lambda x, s: (k_sampling.sample_dpmpp_sde, {"noise_sampler": brownian(x, s)}),
    "dpmpp_2m_sde": lambda x, s: (k_sampling.sample_dpmpp_2m_sde, {"noise_sampler": brownian(x, s)}),
    "dpmpp_2m_sde_heun": lambda x, s: (k_sampling.sample_dpmpp_2m_sde,
                                       {"noise_sampler": brownian(x, s), "solver_type": "heun"}),
    "dpmpp_3m_sde": lambda x, s: (k_sampling.sample_dpmpp_3m_sde, {"noise_sampler": brownian(x, s)}),
    "dpmpp_3m_sde_eta_half": lambda x, s: (k_sampling.sample_dpmpp_3m_sde,
                                           {"noise_sampler": brownian(x, s), "eta": 0.5}),
}


@pytest.mark.parametrize("schedule", ["model", "karras"])
@pytest.mark.parametrize("name", list(RUNS))
def test_sampler_matches_k_diffusion(toy, guided, name, schedule):
    """Fractional timesteps (the default), the same sigmas, noise and Brownian trees: k-diffusion's latents."""
    sigmas = recorded_sigmas(f"sigmas_{schedule}")
    x = unit_noise(SEEDS) * sigmas[0]
    sampler, knobs = RUNS[name](x, sigmas)
    assert_matches(sampler(CompVisDenoiser(toy), x, sigmas, extra_args=guided, disable=True, **knobs),
                   f"{name}/{schedule}")


@pytest.mark.parametrize("eta, key", [(0.0, "dpm_fast"), (1.0, "dpm_fast_eta1")])
def test_dpm_fast_matches_k_diffusion(toy, guided, eta, key):
    denoiser = CompVisDenoiser(toy)
    x = unit_noise(SEEDS) * denoiser.sigma_max
    out = k_sampling.sample_dpm_fast(denoiser, x, denoiser.sigma_min.item(), denoiser.sigma_max.item(), STEPS,
                                     extra_args=guided, disable=True, eta=eta, noise_sampler=stream([21, 22]))
    assert_matches(out, key)


@pytest.mark.parametrize("eta, key", [(0.0, "dpm_adaptive"), (1.0, "dpm_adaptive_eta1")])
def test_dpm_adaptive_matches_k_diffusion(toy, guided, eta, key):
    """The same steps accepted and rejected, the same result."""
    denoiser = CompVisDenoiser(toy)
    x = unit_noise(SEEDS) * denoiser.sigma_max
    out, info = k_sampling.sample_dpm_adaptive(denoiser, x, denoiser.sigma_min.item(), denoiser.sigma_max.item(),
                                               extra_args=guided, disable=True, eta=eta,
                                               noise_sampler=stream([21, 22]), return_info=True)
    assert info == REFERENCE[f"{key}_info"]
    assert_matches(out, key)


def test_lcm_matches_automatic1111(toy, guided):
    denoiser = LCMCompVisDenoiser(toy)
    sigmas = denoiser.get_sigmas(4)
    torch.testing.assert_close(sigmas, recorded_sigmas("lcm_sigmas"), rtol=1e-6, atol=0)
    x = unit_noise(SEEDS) * sigmas[0]
    out = k_sampling.sample_lcm(denoiser, x, sigmas, extra_args={**guided, "cond_scale": 1.5}, disable=True,
                                noise_sampler=stream([21, 22]))
    assert_matches(out, "lcm")


@pytest.mark.parametrize("steps", [10, 20, 36])
def test_restart_matches_automatic1111(toy, guided, steps):
    """Below 20 steps plain Heun; from 20 one restart, from 36 two, over a Karras schedule rebuilt for the rest."""
    sigmas = recorded_sigmas(f"restart_sigmas_{steps}")
    assert len(k_sampling.restart_schedule(sigmas)) == REFERENCE[f"restart_{steps}_plan_length"]
    x = unit_noise(SEEDS) * sigmas[0]
    out = k_sampling.sample_restart(CompVisDenoiser(toy), x, sigmas, extra_args=guided, disable=True,
                                    noise_sampler=stream([21, 22]))
    assert_matches(out, f"restart_{steps}")


@pytest.mark.parametrize("steps, eta", [(10, 0.0), (10, 1.0), (30, 0.0)])
def test_ddim_cfg_pp_matches_automatic1111(toy, steps, eta):
    """Through the registry: AUTOMATIC1111's timesteps (30 steps: 31 timesteps, 1000 // 30 apart), scale / 12.5,
    its run ending at timestep 1 in its own variable, and step noise continuing each image's stream."""
    cond, uncond = conditioning()
    out = sample(toy, "DDIM CFG++", steps, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), eta=eta, disable=True)
    assert_matches(out, f"ddim_cfg_pp_{steps}_{eta}")


@pytest.mark.parametrize("sampler, key", [(k_sampling.sample_euler_cfg_pp, "euler_cfg_pp"),
                                          (k_sampling.sample_euler_ancestral_cfg_pp, "euler_ancestral_cfg_pp")])
def test_euler_cfg_pp_matches_the_reference(toy, guided, sampler, key):
    sigmas = recorded_sigmas("sigmas_model")
    x = unit_noise(SEEDS) * sigmas[0]
    out = sampler(CompVisDenoiser(toy), x, sigmas, extra_args={**guided, "cond_scale": 0.8}, disable=True,
                  noise_sampler=stream([21, 22]))
    assert_matches(out, key)


# --- the tiny UNet, through the registry --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_unet():
    model = instantiate_from_config(OmegaConf.load(str(TEST_CONFIGS / "tiny-v1.yaml")).model)
    model.load_state_dict(random_state_dict(TEST_CONFIGS / "tiny-v1.yaml", 0))
    return model.eval()


def contexts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)


@pytest.mark.parametrize("name, registered, steps", [("euler", "Euler", 7), ("euler_a", "Euler a", 7),
                                                     ("dpm2_karras", "DPM2 Karras", 5),
                                                     ("dpmpp_2m_sde", "DPM++ 2M SDE", 7)])
def test_registry_on_the_tiny_unet_matches_k_diffusion(tiny_unet, name, registered, steps):
    """Seeds 11 and 12 through `sample`: fractional timesteps, each image's noise stream and its own Brownian tree."""
    cond, uncond = contexts()
    sigmas = recorded_sigmas(f"unet_sigmas/{name}")  # Karras: k-diffusion's float32 formula, 1 ulp from ours
    torch.testing.assert_close(resolve_sampler(registered).sigmas(CompVisDenoiser(tiny_unet), steps), sigmas,
                               rtol=1e-6, atol=0)
    out = sample(tiny_unet, registered, steps, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True,
                 sigmas=sigmas)
    assert_matches(out, f"unet/{name}")


# --- what the registry adds -----------------------------------------------------------------------------------------
def test_quantize_is_an_option(toy, guided):
    """Fractional timesteps by default; quantize=True is k-diffusion's quantized denoiser."""
    cond, uncond = conditioning()
    fractional = sample(toy, "DPM2", 6, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True)
    quantized = sample(toy, "DPM2", 6, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True, quantize=True)
    denoiser = CompVisDenoiser(toy, quantize=True)
    sigmas = denoiser.get_sigmas(6)
    expected = k_sampling.sample_dpm_2(denoiser, unit_noise(SEEDS) * sigmas[0], sigmas, extra_args=guided,
                                       disable=True)
    torch.testing.assert_close(quantized, expected, rtol=0, atol=0)
    assert (fractional - quantized).abs().max() > 1e-4


def test_discard_next_to_last_sigma_is_automatic1111s_rule(toy):
    """steps + 1 levels without the next-to-last: DPM2's last step then goes from sigma_min straight to 0."""
    spec = resolve_sampler("dpm2_karras")
    denoiser = CompVisDenoiser(toy)
    longer = spec.sigmas(denoiser, 7)
    discarded = spec.sigmas(denoiser, 6, discard_next_to_last_sigma=True)
    assert torch.equal(discarded, torch.cat([longer[:-2], longer[-1:]])) and len(discarded) == 7
    cond, uncond = conditioning()
    run = sample(toy, "dpm2_karras", 6, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True,
                 discard_next_to_last_sigma=True)
    given = sample(toy, "dpm2_karras", 6, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True,
                   sigmas=discarded)
    assert torch.equal(run, given)


def test_sde_samplers_take_one_tree_per_image_seed(toy):
    """The registry seeds each image's tree with that image's seed (AUTOMATIC1111's choice), or with tree_seeds."""
    cond, uncond = conditioning()
    ours = sample(toy, "DPM++ 3M SDE", 6, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True)
    denoiser = CompVisDenoiser(toy)
    sigmas = denoiser.get_sigmas(6)
    x = unit_noise(SEEDS) * sigmas[0]
    tree = k_sampling.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=SEEDS)
    expected = k_sampling.sample_dpmpp_3m_sde(denoiser, x, sigmas, disable=True, noise_sampler=tree,
                                              extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE})
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    other = sample(toy, "DPM++ 3M SDE", 6, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True,
                   tree_seeds=[31, 32])
    assert (other - ours).abs().mean() > 0.05


def test_sde_trees_draw_from_the_noises_random_source(toy):
    """A request with the NV (emulated CUDA) source draws its trees' numbers from it too, as AUTOMATIC1111's trees
    draw with randn_local; the CPU source gives torchsde's own draws."""
    cond, uncond = conditioning()
    denoiser = CompVisDenoiser(toy)
    sigmas = denoiser.get_sigmas(5)
    runs = {}
    for rng in ("cpu", "nv"):
        noise = ImageNoise(SEEDS, rng=rng)
        ours = sample(toy, "DPM++ 2M SDE", 5, SHAPE, cond, uncond, SCALE, noise, disable=True)
        check = ImageNoise(SEEDS, rng=rng)
        x = check.randn(SHAPE) * sigmas[0]
        tree = k_sampling.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=SEEDS, randn=check.seeded_randn)
        expected = k_sampling.sample_dpmpp_2m_sde(denoiser, x, sigmas, disable=True, noise_sampler=tree,
                                                  extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE})
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        runs[rng] = ours
    assert (runs["cpu"] - runs["nv"]).abs().mean() > 0.05


def test_img2img_trees_span_the_whole_schedule(toy):
    """AUTOMATIC1111 builds an img2img run's tree over the whole schedule's range, not the part that runs."""
    cond, uncond = conditioning()
    x_init, start = unit_noise([1, 2]), unit_noise([3, 4])
    ours = sample_img2img(toy, "dpmpp_sde", 8, x_init, 0.5, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True,
                          start_noise=start)
    denoiser = CompVisDenoiser(toy)
    sigmas = denoiser.get_sigmas(8)
    x = x_init + start * sigmas[4]
    tree = k_sampling.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=SEEDS)
    expected = k_sampling.sample_dpmpp_sde(denoiser, x, sigmas[4:], disable=True, noise_sampler=tree,
                                           extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE})
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_dpm_fast_and_adaptive_run_as_automatic1111_runs_them(toy, guided):
    """Over the model's whole sigma range whatever the schedule, with eta 1 and each image's noise stream."""
    cond, uncond = conditioning()
    denoiser = CompVisDenoiser(toy)
    for name, function, knobs in (("DPM fast", k_sampling.sample_dpm_fast, {"n": 6}),
                                  ("DPM adaptive", k_sampling.sample_dpm_adaptive, {})):
        ours = sample(toy, name, 6, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True)
        noise = ImageNoise(SEEDS)
        x = noise.randn(SHAPE) * denoiser.get_sigmas(6)[0]
        expected = function(denoiser, x, denoiser.sigma_min.item(), denoiser.sigma_max.item(), extra_args=guided,
                            disable=True, eta=1.0, noise_sampler=noise.noise_sampler(x), **knobs)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_lcm_and_restart_run_through_the_registry(toy):
    cond, uncond = conditioning()
    for name in ("LCM", "Restart", "Euler CFG++", "Euler Ancestral CFG++"):
        out = sample(toy, name, 4, SHAPE, cond, uncond, 1.5, ImageNoise(SEEDS), disable=True)
        assert out.shape == SHAPE and bool(out.isfinite().all())
    with pytest.raises(ValueError, match="eps-predicting"):
        sample(NonlinearToyDiffusion(parameterization="v"), "LCM", 4, SHAPE, cond, uncond, 1.5, ImageNoise(SEEDS))
    with pytest.raises(ValueError, match="takes no eta"):
        sample(toy, "LCM", 4, SHAPE, cond, uncond, 1.5, ImageNoise(SEEDS), eta=0.5)


def test_ddim_cfg_pp_starts_from_an_image_as_automatic1111(toy):
    """Noised to timestep t_enc of its list, then denoised over the t_enc - 1 steps below: at strength 0.5 of 10
    steps, noised to timestep 501 and evaluated first at 401."""
    cond, uncond = conditioning()
    x_init, start = unit_noise([1, 2]), unit_noise([3, 4])
    ours = sample_img2img(toy, "DDIM CFG++", 10, x_init, 0.5, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True,
                          start_noise=start)
    alpha = toy.alphas_cumprod[501]
    x_vp = x_init * alpha.sqrt() + start * (1 - alpha).sqrt()
    denoiser = CompVisDenoiser(toy)
    sigmas = denoiser.sigmas[[401, 301, 201, 101, 1]]
    x = k_sampling.sample_euler_cfg_pp(denoiser, x_vp * (sigmas[0] ** 2 + 1) ** 0.5, sigmas, disable=True,
                                       extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE / 12.5})
    torch.testing.assert_close(ours, x / (sigmas[-1] ** 2 + 1) ** 0.5, rtol=1e-6, atol=1e-6)


def test_the_denoiser_gives_cfg_pp_the_unconditional_estimate(toy):
    cond, uncond = conditioning()
    denoiser = CompVisDenoiser(toy)
    x, sigma = unit_noise(SEEDS) * 3.0, torch.full((2,), 3.0)
    guided, unconditional = denoiser(x, sigma, cond=cond, uncond=uncond, cond_scale=1.0, return_uncond=True)
    torch.testing.assert_close(unconditional, denoiser(x, sigma, cond=uncond))
    torch.testing.assert_close(guided, denoiser(x, sigma, cond=cond))
    alone, same = denoiser(x, sigma, cond=cond, return_uncond=True)
    assert torch.equal(alone, same)


# --- known answers: Gaussian data -----------------------------------------------------------------------------------
def exact_ode_end(toy, cond, x, sigma_start, sigma_end):
    """The probability-flow ODE's solution for data N(m, s^2): m + (x - m) sqrt((s^2 + sigma_end^2) / (s^2 +
    sigma_start^2))."""
    mean = toy.mu + cond.reshape(-1, 1, 1, 1)
    return mean + (x - mean) * ((toy.std**2 + sigma_end**2) / (toy.std**2 + sigma_start**2)) ** 0.5


@pytest.fixture(scope="module")
def gaussian():
    toy = ContinuousGaussianData().double()
    return toy, CompVisDenoiser(toy), torch.tensor([0.3, -0.4], dtype=torch.float64)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_steps_have_their_order(gaussian, order):
    """DPM-Solver-k's local error from an exact x shrinks as h^(k+1) (Lu et al. 2022, theorem 3.2)."""
    toy, denoiser, cond = gaussian
    solver = k_sampling.DPMSolver(denoiser, {"cond": cond})
    sigma_max = denoiser.sigma_max.double()
    x_start = unit_noise(SEEDS).double() * sigma_max
    t = torch.tensor(-math.log(0.5), dtype=torch.float64)
    x = exact_ode_end(toy, cond, x_start, sigma_max, solver.sigma(t))
    errors = []
    for h in (0.1, 0.05):
        step = {1: solver.dpm_solver_1_step, 2: solver.dpm_solver_2_step, 3: solver.dpm_solver_3_step}[order]
        x_next, _ = step(x, t, t + h)
        errors.append(float((x_next - exact_ode_end(toy, cond, x_start, sigma_max, solver.sigma(t + h))).abs().max()))
    assert math.log2(errors[0] / errors[1]) > order + 1 - 0.2, errors


def test_dpm_fast_approaches_the_exact_solution(gaussian):
    """Its error is that of its last, first- and second-order, steps: 4e-2 at 12 evaluations, 3e-4 at 48."""
    toy, denoiser, cond = gaussian
    sigma_min, sigma_max = denoiser.sigma_min.double(), denoiser.sigma_max.double()
    x = unit_noise(SEEDS).double() * sigma_max
    exact = exact_ode_end(toy, cond, x, sigma_max, sigma_min)
    errors = [float((k_sampling.sample_dpm_fast(denoiser, x, sigma_min, sigma_max, n, extra_args={"cond": cond},
                                                disable=True) - exact).abs().max()) for n in (12, 48)]
    assert errors[1] < 1e-3 and errors[0] > 1e-2, errors


def test_dpm_adaptive_meets_its_tolerance(gaussian):
    """Tighter tolerances: more evaluations, smaller errors (4e-2 at the defaults, 2e-4 at rtol 1e-4)."""
    toy, denoiser, cond = gaussian
    sigma_min, sigma_max = denoiser.sigma_min.double(), denoiser.sigma_max.double()
    x = unit_noise(SEEDS).double() * sigma_max
    exact = exact_ode_end(toy, cond, x, sigma_max, sigma_min)
    errors, evaluations = [], []
    for rtol, atol in ((0.05, 0.0078), (1e-3, 1e-4), (1e-4, 1e-5)):
        out, info = k_sampling.sample_dpm_adaptive(denoiser, x, sigma_min, sigma_max, extra_args={"cond": cond},
                                                   disable=True, return_info=True, rtol=rtol, atol=atol)
        errors.append(float((out - exact).abs().max()))
        evaluations.append(info["nfe"])
    assert errors == sorted(errors, reverse=True) and evaluations == sorted(evaluations), (errors, evaluations)
    assert errors[-1] < 1e-3


def test_third_order_multistep_beats_second_order(gaussian):
    """DPM++ 3M SDE without noise (eta 0) is the third-order multistep ODE solver; its first- and second-order
    starting steps limit it to second order globally, but it is several times more accurate than 2M throughout."""
    toy, denoiser, cond = gaussian
    errors = {}
    for sampler in (k_sampling.sample_dpmpp_2m_sde, k_sampling.sample_dpmpp_3m_sde):
        errors[sampler] = []
        for steps in (40, 80, 160):
            sigmas = k_sampling.get_sigmas_karras(steps + 1, denoiser.sigma_min, denoiser.sigma_max,
                                                  dtype=torch.float64)[:-1]
            x = unit_noise(SEEDS).double() * sigmas[0]
            out = sampler(denoiser, x, sigmas, extra_args={"cond": cond}, disable=True, eta=0.0)
            errors[sampler].append(float((out - exact_ode_end(toy, cond, x, sigmas[0], sigmas[-1])).abs().max()))
    second, third = errors[k_sampling.sample_dpmpp_2m_sde], errors[k_sampling.sample_dpmpp_3m_sde]
    assert all(b < a / 3 for a, b in zip(second, third)), errors
    assert min(math.log2(a / b) for a, b in zip(third, third[1:])) > 1.7, third


@pytest.mark.parametrize("sampler, knobs, order", [
    (k_sampling.sample_dpmpp_2m_sde, {"eta": 0.0}, 2),
    (k_sampling.sample_dpmpp_2m_sde, {"eta": 0.0, "solver_type": "heun"}, 2),
    (k_sampling.sample_restart, {"restart_list": {}}, 2),  # no restarts: Heun's method
])
def test_sde_samplers_without_noise_converge_at_their_order(gaussian, sampler, knobs, order):
    """eta = 0 leaves the multistep solvers of the probability-flow ODE, which converge at their order on Karras
    sigmas stopping at sigma_min (DPM++ 2M SDE is then DPM++ 2M)."""
    toy, denoiser, cond = gaussian
    errors, step_counts = [], [20, 40, 80]
    for steps in step_counts:
        sigmas = k_sampling.get_sigmas_karras(steps + 1, denoiser.sigma_min, denoiser.sigma_max,
                                              dtype=torch.float64)[:-1]
        x = unit_noise(SEEDS).double() * sigmas[0]
        out = sampler(denoiser, x, sigmas, extra_args={"cond": cond}, disable=True, **knobs)
        errors.append(float((out - exact_ode_end(toy, cond, x, sigmas[0], sigmas[-1])).abs().max()))
    orders = [math.log(a / b) / math.log(2) for a, b in zip(errors, errors[1:])]
    assert min(orders) > order - 0.3, (errors, orders)


@pytest.mark.parametrize("sampler, knobs, std_tolerance", [
    (k_sampling.sample_dpmpp_3m_sde, {}, 0.01),
    (k_sampling.sample_dpmpp_2m_sde, {"solver_type": "heun"}, 0.01),
    (k_sampling.sample_euler_ancestral_cfg_pp, {}, 0.03),
])
def test_stochastic_new_samplers_sample_the_data_distribution(sampler, knobs, std_tolerance):
    """Data N(3, 0.5^2), 60 Karras steps, one Brownian tree per image: mean 3 and std 0.5 (the CFG++ one, with cond
    = uncond, is Euler a, whose first-order steps leave it narrower: 0.473)."""
    toy = ContinuousGaussianData(mu=3.0)
    denoiser = CompVisDenoiser(toy)
    sigmas = k_sampling.get_sigmas_karras(60, denoiser.sigma_min, denoiser.sigma_max)
    noise = ImageNoise(list(range(4)))
    x = noise.randn((4, 4, 32, 32)) * sigmas[0]
    tree = k_sampling.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=noise.seeds)
    zeros = torch.zeros(4)
    out = sampler(denoiser, x, sigmas, extra_args={"cond": zeros, "uncond": zeros, "cond_scale": 1.0}, disable=True,
                  noise_sampler=tree, **knobs)
    assert abs(float(out.mean()) - 3.0) < 0.015
    assert abs(float(out.std()) - 0.5) < std_tolerance
