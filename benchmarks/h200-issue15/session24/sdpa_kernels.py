# Which kernels PyTorch's SDPA runs for one decode query over 128K tokens of a Llama-3-8B
# layer (32 query / 8 KV heads of 128, bf16, enable_gqa), for Nsight Compute to time: the
# peer that issue 16's decode target is measured against (session 24, call 7).
import torch
import torch.nn.functional as F

dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16, device=dev, generator=gen)
k = torch.randn(1, 8, 131072, 128, dtype=torch.bfloat16, device=dev, generator=gen)
v = torch.randn(1, 8, 131072, 128, dtype=torch.bfloat16, device=dev, generator=gen)
for _ in range(6):
    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
torch.cuda.synchronize()
