# Can the GPU read page-cached weight files directly? Per shard of a model directory (argv[1]): a pageable
# copy, then cudaHostRegister of its read-only mmap (time), the copy from it (time), unregistering (time).
# On the GPU machine: python3 benches/h2d_register.py /tmp/glm4-9b-random/base (after gpu_e2e.sh built it).
import mmap, os, glob, sys, time, torch, numpy as np, warnings
warnings.filterwarnings("ignore")
dev = torch.device("cuda")
cudart = torch.cuda.cudart()
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.safetensors")))[:2]:
    fd = os.open(f, os.O_RDONLY); size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    arr = np.frombuffer(mm, dtype=np.uint8)
    arr.sum(dtype=np.uint64)  # in the page cache, mapped
    src = torch.from_numpy(arr)
    dst = torch.empty(size, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(); t = time.perf_counter(); dst.copy_(src); torch.cuda.synchronize()
    print(f"{os.path.basename(f)} {size/1e9:.2f} GB pageable copy: {size/(time.perf_counter()-t)/1e9:.1f} GB/s")
    ptr = arr.ctypes.data
    for flags in (8, 8 | 2):  # cudaHostRegisterReadOnly (| Mapped)
        t = time.perf_counter(); r = cudart.cudaHostRegister(ptr, size, flags); reg = time.perf_counter() - t
        if int(r) != 0:
            print("register flags", flags, "failed:", r); continue
        torch.cuda.synchronize(); t = time.perf_counter(); dst.copy_(src, non_blocking=True); torch.cuda.synchronize(); cp = time.perf_counter() - t
        t = time.perf_counter(); cudart.cudaHostUnregister(ptr); un = time.perf_counter() - t
        print(f"  flags {flags}: register {reg*1e3:.0f} ms ({size/reg/1e9:.1f} GB/s), copy {cp*1e3:.0f} ms ({size/cp/1e9:.1f} GB/s), unregister {un*1e3:.0f} ms")
    del src, arr; mm.close(); os.close(fd)
