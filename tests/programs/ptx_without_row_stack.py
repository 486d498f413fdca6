"""kvwire.cuda.ptx (every kernel compiled to PTX for the SMs given as arguments) on a numpy
without np.row_stack, as numpy 2.5 is: numba-cuda registers an overload of it when it loads
for a GPU, and kvwire.cuda.compat must restore the alias first."""

import runpy

import numpy

vars(numpy).pop("row_stack", None)
runpy.run_module("kvwire.cuda.ptx", run_name="__main__")
