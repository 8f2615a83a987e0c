-- wrk script for bench_peers.py --client wrk: POST prebuilt request bodies (one file each, listed in the file
-- WRK_BODIES names) round-robin to WRK_PATH with content type WRK_CTYPE. Bodies load once per wrk thread.
local bodies, i = {}, 0
local path, ctype = os.getenv("WRK_PATH"), os.getenv("WRK_CTYPE")

function init(args)
  for name in io.open(os.getenv("WRK_BODIES")):lines() do
    local f = io.open(name, "rb")
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
end

function request()
  i = i % #bodies + 1
  return wrk.format("POST", path, {["Content-Type"] = ctype}, bodies[i])
end
