#!/usr/bin/env python3
# python3 benches/flash_sim.py (numpy): no GPU needed.
# Lane-level simulation of kernels/fused.cu flash_attn (float32, no bf16 rounding): checks the kernel's
# fragment indexing, masking and online softmax against plain attention. mma.m16n8k16 is emulated from
# the PTX fragment layouts (A: a0a1 (g, 2tq), a2a3 (g+8, 2tq), a4a5 (g, 2tq+8), a6a7 (g+8, 2tq+8);
# B: b0b1 (k 2tq, n g), b2b3 (k 2tq+8, n g); C: c0c1 (g, 2tq), c2c3 (g+8, 2tq)).
import numpy as np
rng = np.random.default_rng(0)

def mma(c, a, b):  # c[lane][4], a[lane][4 regs of 2], b[lane][2 regs of 2]
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane in range(32):
        g, tq = lane >> 2, lane & 3
        for r, (row, col) in enumerate([(g, 2*tq), (g+8, 2*tq), (g, 2*tq+8), (g+8, 2*tq+8)]):
            A[row, col], A[row, col+1] = a[lane][r]
        for r, k in enumerate([2*tq, 2*tq+8]):
            B[k, g], B[k+1, g] = b[lane][r]
    C = A @ B
    for lane in range(32):
        g, tq = lane >> 2, lane & 3
        c[lane][0] += C[g, 2*tq]; c[lane][1] += C[g, 2*tq+1]; c[lane][2] += C[g+8, 2*tq]; c[lane][3] += C[g+8, 2*tq+1]

def flash(q, k, v, pad, nh, kvh, t, s, D, ld):
    B_ = q.shape[0]; BR = BC = 64; KS, ND, NT = D // 16, D // 8, BC // 8
    out = np.full((B_ * t, ld), np.nan)
    for b in range(B_):
        for h in range(nh):
            for q0 in range(0, t, BR):
                offset, lo, kv = s - t, pad[b], h // (nh // kvh)
                last = min(q0 + BR, t) - 1
                for warp in range(4):
                    rows = [[q0 + warp*16 + (l >> 2), q0 + warp*16 + (l >> 2) + 8] for l in range(32)]
                    qa = [[[None]*4 for _ in range(KS)] for _ in range(32)]
                    for l in range(32):
                        tq = l & 3
                        for kk in range(KS):
                            for r in range(4):
                                i, c = rows[l][r & 1], kk*16 + tq*2 + (r >> 1)*8
                                qa[l][kk][r] = (q[b, h, i, c], q[b, h, i, c+1]) if i < t else (0.0, 0.0)
                    m = [[-np.inf]*2 for _ in range(32)]; L = [[0.0]*2 for _ in range(32)]
                    o = [[[0.0]*4 for _ in range(ND)] for _ in range(32)]
                    warp_last = min(q0 + warp*16 + 15, t - 1)
                    j0 = (lo // BC) * BC
                    while j0 <= offset + last and j0 < s:
                        ks = np.zeros((BC, D)); vs = np.zeros((BC, D))
                        for r in range(BC):
                            if j0 + r < s: ks[r] = k[b, kv, j0 + r]; vs[r] = v[b, kv, j0 + r]
                        if warp_last < 0 or j0 > offset + warp_last:
                            j0 += BC; continue
                        sc = [[[0.0]*4 for _ in range(NT)] for _ in range(32)]
                        for n in range(NT):
                            for kk in range(KS):
                                bfr = []
                                for l in range(32):
                                    g, tq = l >> 2, l & 3
                                    kr = ks[n*8 + g]; c = kk*16 + tq*2
                                    bfr.append([(kr[c], kr[c+1]), (kr[c+8], kr[c+9])])
                                cc = [sc[l][n] for l in range(32)]
                                mma(cc, [qa[l][kk] for l in range(32)], bfr)
                        tmax = [[-np.inf]*2 for _ in range(32)]
                        for l in range(32):
                            tq = l & 3
                            for n in range(NT):
                                for e in range(4):
                                    i, j = rows[l][e >> 1], j0 + n*8 + tq*2 + (e & 1)
                                    seen = i < t and j < s and j >= lo and j <= offset + i
                                    x = sc[l][n][e] * scale if seen else -np.inf
                                    sc[l][n][e] = x; tmax[l][e >> 1] = max(tmax[l][e >> 1], x)
                        for l in range(32):  # quad reduce (xor 1, 2)
                            pass
                        tm = [[max(tmax[l2][r] for l2 in range(32) if l2 >> 2 == l >> 2) for r in range(2)] for l in range(32)]
                        alpha = [[0.0]*2 for _ in range(32)]; mn = [[0.0]*2 for _ in range(32)]
                        for l in range(32):
                            for r in range(2):
                                mn[l][r] = max(m[l][r], tm[l][r])
                                alpha[l][r] = 0.0 if m[l][r] == -np.inf else np.exp(m[l][r] - mn[l][r])
                                m[l][r] = mn[l][r]
                        pa = [[[None]*4 for _ in range(BC//16)] for _ in range(32)]
                        sm = [[0.0]*2 for _ in range(32)]
                        for l in range(32):
                            for n in range(NT):
                                p = [0.0 if sc[l][n][e] == -np.inf else np.exp(sc[l][n][e] - mn[l][e >> 1]) for e in range(4)]
                                sm[l][0] += p[0] + p[1]; sm[l][1] += p[2] + p[3]
                                pa[l][n >> 1][(n & 1)*2 + 0] = (p[0], p[1])
                                pa[l][n >> 1][(n & 1)*2 + 1] = (p[2], p[3])
                        sq = [[sum(sm[l2][r] for l2 in range(32) if l2 >> 2 == l >> 2) for r in range(2)] for l in range(32)]
                        for l in range(32):
                            for r in range(2): L[l][r] = L[l][r]*alpha[l][r] + sq[l][r]
                            for n in range(ND):
                                o[l][n][0] *= alpha[l][0]; o[l][n][1] *= alpha[l][0]; o[l][n][2] *= alpha[l][1]; o[l][n][3] *= alpha[l][1]
                        for kk in range(BC // 16):
                            for n in range(ND):
                                bfr = []
                                for l in range(32):
                                    g, tq = l >> 2, l & 3
                                    base = kk*16 + tq*2; col = n*8 + g
                                    bfr.append([(vs[base, col], vs[base+1, col]), (vs[base+8, col], vs[base+9, col])])
                                cc = [o[l][n] for l in range(32)]
                                mma(cc, [pa[l][kk] for l in range(32)], bfr)
                        j0 += BC
                    for l in range(32):
                        tq = l & 3
                        for r in range(2):
                            i = rows[l][r]
                            if i >= t: continue
                            inv = 1.0 / L[l][r] if L[l][r] > 0 else 0.0
                            for n in range(ND):
                                c0 = h*D + n*8 + tq*2
                                out[b*t + i, c0] = o[l][n][r*2] * inv; out[b*t + i, c0+1] = o[l][n][r*2+1] * inv
                    if h == 0:
                        for i in range(q0 + warp*16, min(q0 + warp*16 + 16, t)):
                            out[b*t + i, nh*D:] = 0.0
    return out

def eager(q, k, v, pad, nh, kvh, t, s, D):
    B_ = q.shape[0]; res = np.zeros((B_ * t, nh * D)); offset = s - t
    for b in range(B_):
        for h in range(nh):
            kv = h // (nh // kvh)
            sc = q[b, h] @ k[b, kv, :s].T * scale
            for i in range(t):
                for j in range(s):
                    if not (pad[b] <= j <= offset + i): sc[i, j] = -np.inf
            mx = sc.max(axis=1, keepdims=True)
            p = np.where(np.isfinite(sc), np.exp(sc - np.where(np.isfinite(mx), mx, 0)), 0.0)
            den = p.sum(axis=1, keepdims=True)
            p = np.divide(p, den, out=np.zeros_like(p), where=den > 0)
            res[b*t:(b+1)*t, h*D:(h+1)*D] = p @ v[b, kv, :s]
    return res

D, nh, kvh, B_ = 16, 4, 2, 2
scale = 1 / np.sqrt(D)
for t, cached, pads in [(70, 0, [0, 5]), (20, 75, [3, 80])]:
    s = t + cached
    q = rng.standard_normal((B_, nh, t, D)); k = rng.standard_normal((B_, kvh, s, D)); v = rng.standard_normal((B_, kvh, s, D))
    ld = nh * D + 64
    got = flash(q, k, v, pads, nh, kvh, t, s, D, ld)
    want = eager(q, k, v, pads, nh, kvh, t, s, D)
    assert not np.isnan(got).any(), "unwritten output"
    print(f"t={t} cached={cached} pads={pads}: max |diff| {np.abs(got[:, :nh*D] - want).max():.2e}, tail zeros {np.all(got[:, nh*D:] == 0)}")
