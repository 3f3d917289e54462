"""LoRA r=64 adapter shapes on every linear layer of Llama architectures (A: r×in, B: out×r)."""

ARCHITECTURES = {
    # name: (layers, hidden, intermediate, kv_dim)
    "llama-3.2-1b": (16, 2048, 8192, 512),
    "llama-3.1-8b": (32, 4096, 14336, 1024),
    "tiny": (2, 64, 160, 32),
}


def lora_shapes(arch: str, rank: int = 64) -> list[tuple[int, int]]:
    layers, hidden, intermediate, kv = ARCHITECTURES[arch]
    linears = [  # (in, out) of q, k, v, o, gate, up, down
        (hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
        (hidden, intermediate), (hidden, intermediate), (intermediate, hidden),
    ]
    shapes = []
    for _ in range(layers):
        for fan_in, fan_out in linears:
            shapes += [(rank, fan_in), (fan_out, rank)]
    return shapes
