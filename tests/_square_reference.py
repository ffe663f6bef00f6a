"""Float64 transcriptions of the reference Square attack's pieces, shared by its tests."""

import numpy as np


def eta_l2(s: int) -> np.ndarray:
  """The reference ``eta(s)`` of the L2 Square attack, written with loops (float64)."""
  def rect(a, b):
    d = np.zeros((a, b))
    r0, c0 = a // 2, b // 2
    for n in range(max(a // 2 + 1, b // 2 + 1)):
      d[max(r0, 0):min(r0 + 2 * n + 1, a), max(c0, 0):min(c0 + 2 * n + 1, b)] += 1.0 / (n + 1)**2
      r0 -= 1
      c0 -= 1
    return d / np.sqrt((d**2).sum())

  e = np.zeros((s, s))
  e[:s // 2] = rect(s // 2, s)
  e[s // 2:] = -rect(s - s // 2, s)
  return e / np.sqrt((e**2).sum())
