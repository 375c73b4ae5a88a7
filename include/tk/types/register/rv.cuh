// Register vectors: one value per row (rv_rows, what row reductions give) or per column (rv_cols,
// what column reductions give) of a register tile, spread over the warp like the tile itself.
#pragma once

#include "rt.cuh"

namespace tk {

// One value per row of a Rows-row tile: each lane holds rows g and g + 8 of every 16-row band;
// the 4 lanes of a quad hold the same values.
template <tile_element T, int Rows>
struct rv_rows {
    static_assert(Rows > 0 && Rows % 16 == 0, "rv_rows length must be a positive multiple of 16");
    using dtype = T;
    static constexpr int length = Rows;
    T data[Rows / 16][2];
};

// One value per column of a Cols-column tile: each lane holds columns 2t, 2t+1, 2t+8, 2t+9 of
// every 16-column band; the 8 lanes sharing t hold the same values.
template <tile_element T, int Cols>
struct rv_cols {
    static_assert(Cols > 0 && Cols % 16 == 0, "rv_cols length must be a positive multiple of 16");
    using dtype = T;
    static constexpr int length = Cols;
    T data[Cols / 16][4];
};

// Any per-row value (e.g. the key range a query row sees), spread over the warp like rv_rows: what
// warp::mask takes to decide, row by row, which columns to keep.
template <typename X, int Rows>
struct row_values {
    static_assert(Rows > 0 && Rows % 16 == 0, "row_values length must be a positive multiple of 16");
    static constexpr int length = Rows;
    X data[Rows / 16][2];
};

template <register_tile RT>
using rows_of = rv_rows<typename RT::dtype, RT::rows>;
template <register_tile RT>
using cols_of = rv_cols<typename RT::dtype, RT::cols>;

}  // namespace tk
