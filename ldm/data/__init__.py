"""Training data: the coloured-shapes set this project draws itself (`shapes`) and a folder of captioned images
(`folder`). Every item is {"image": float tensor [3, H, W] in [-1, 1], "caption": str, "index": int}; an item is a
function of its index, so training may cache what it computes from one."""
