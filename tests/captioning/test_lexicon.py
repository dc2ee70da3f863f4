"""Caption directions under the input pipeline's flips and rotations (lexicon.reorient_caption)."""

import pytest

from data_prep.captioning import lexicon as lx

CAPTION = ("Water lies in the north-east of the tile, on steep North-facing slopes; the top-left "
           "corner is forest and the upper side cropland. In the western part lies a town.")
KEPT = ("A summer scene in the northern hemisphere, in the north of Spain, in the northern part of "
        "the Alps, near South Africa and North Macedonia, on the east coast. The right choice.")


@pytest.mark.parametrize("flips, expected", [
    (dict(flip_lr=True, flip_ud=False, rot90=0),
     "Water lies in the north-west of the tile, on steep North-facing slopes; the top-right "
     "corner is forest and the upper side cropland. In the eastern part lies a town."),
    (dict(flip_lr=False, flip_ud=True, rot90=0),
     "Water lies in the south-east of the tile, on steep South-facing slopes; the bottom-left "
     "corner is forest and the lower side cropland. In the western part lies a town."),
    (dict(flip_lr=False, flip_ud=False, rot90=1),  # counter-clockwise: north goes west
     "Water lies in the north-west of the tile, on steep West-facing slopes; the bottom-left "
     "corner is forest and the left side cropland. In the southern part lies a town."),
    (dict(flip_lr=True, flip_ud=True, rot90=2),  # the identity
     CAPTION),
])
def test_in_tile_directions_turn(flips, expected):
  assert lx.reorient_caption(CAPTION, **flips) == expected


def test_places_and_hemispheres_keep_their_words():
  for rot90 in range(4):
    for flip_lr in (False, True):
      assert lx.reorient_caption(KEPT, flip_lr=flip_lr, flip_ud=False, rot90=rot90) == KEPT


def test_four_quarter_turns_and_double_flips_are_the_identity():
  for word in lx.COMPASS:
    bearing = lx.compass_angle(word)
    assert lx.transform_bearing(bearing, flip_lr=False, flip_ud=False, rot90=4) == bearing
    twice = lx.transform_bearing(lx.transform_bearing(bearing, flip_lr=True, flip_ud=False, rot90=0),
                                 flip_lr=True, flip_ud=False, rot90=0)
    assert twice == bearing
