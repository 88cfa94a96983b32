"""First on the path of the TVM tracker and server processes this machine starts
(`hw_profiles.rpc._spawn`): they need no torch, and `tvm_ffi` imports torch whenever it can."""

raise ImportError("hwnas runs TVM's RPC tracker and server without torch")
