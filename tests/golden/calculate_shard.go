// Golden vectors for the seed's placement hash (calculateShard of
// /work/shared/seed/dialog-sharding-architecture.md, "Hash Algorithm").
//
// Regenerate (from the repository root, Go >= 1.19, no modules needed):
//
//	go run tests/golden/calculate_shard.go > tests/golden/calculate_shard_vectors.json
//
// The output is deterministic (fixed PRNG seed), so regenerating must produce
// no diff unless this program changes. tests/test_routing.py checks every
// vector against server.routing.calculate_shard and server.routing.pair_hash.
//
// The only departure from the design document is that NumShards is a
// parameter instead of a package constant, and that min/max are small helpers
// because Go 1.19 has no generic min/max builtins (they have the builtin
// semantics for Go int, which is int64 on every platform we target).
package main

import (
	"encoding/json"
	"fmt"
	"math"
	"math/rand"
	"os"
	"strconv"
)

func minInt(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func maxInt(a, b int) int {
	if a > b {
		return a
	}
	return b
}

// pairHash is the body of calculateShard up to (not including) the modulo.
func pairHash(userID1, userID2 int) uint64 {
	minID := minInt(userID1, userID2)
	maxID := maxInt(userID1, userID2)

	// Enhanced hash function with good distribution properties
	hash := uint64(minID)*2654435761 + uint64(maxID)*2654435789
	hash = hash ^ (hash >> 16)
	hash = hash * 2654435761
	hash = hash ^ (hash >> 16)
	return hash
}

// calculateShard is the design document's function, verbatim in logic.
func calculateShard(userID1, userID2 int, NumShards int) int {
	minID := minInt(userID1, userID2)
	maxID := maxInt(userID1, userID2)

	// Enhanced hash function with good distribution properties
	hash := uint64(minID)*2654435761 + uint64(maxID)*2654435789
	hash = hash ^ (hash >> 16)
	hash = hash * 2654435761
	hash = hash ^ (hash >> 16)

	return int(hash % uint64(NumShards))
}

type vector struct {
	A         int64  `json:"a"`
	B         int64  `json:"b"`
	NumShards int    `json:"num_shards"`
	Shard     int    `json:"shard"`
	Hash      string `json:"hash"` // uint64 as a decimal string (exceeds JSON's safe integers)
}

var shardCounts = []int{1, 2, 3, 4, 7, 8, 16, 1024, 4096}

const seed = 20240601

func main() {
	if strconv.IntSize != 64 {
		fmt.Fprintln(os.Stderr, "Go int must be 64 bits")
		os.Exit(1)
	}
	var out []vector
	emit := func(a, b int64, n int) {
		h := pairHash(int(a), int(b))
		s := calculateShard(int(a), int(b), n)
		if uint64(s) != h%uint64(n) {
			panic("pairHash and calculateShard disagree")
		}
		out = append(out, vector{A: a, B: b, NumShards: n, Shard: s, Hash: strconv.FormatUint(h, 10)})
	}

	// The design document's reference examples, as asserted by the tests.
	refs := [][3]int64{
		{12345, 67890, 4}, {1, 2, 4}, {100, 200, 4}, {7, 42, 16},
		{math.MaxInt64, 1, 4}, {1000000, 999999, 1024},
	}
	for _, r := range refs {
		emit(r[0], r[1], int(r[2]))
	}

	// Hand-picked edge cases: every pair (including equal ids) in both
	// orders; the shard count cycles so each pair meets several of them
	// (the hash is independent of the shard count and is recorded anyway).
	edges := []int64{
		1, 2, 3, 7, 42, 100, 200, 12345, 67890, 999999, 1000000,
		1<<31 - 1, 1 << 31, 1<<31 + 1,
		1<<32 - 1, 1 << 32, 1<<32 + 1,
		1<<53 - 1, 1 << 53, 1<<53 + 1,
		1<<62 - 1, 1 << 62, 1<<62 + 1,
		math.MaxInt64 - 1, math.MaxInt64,
	}
	k := 0
	for i, a := range edges {
		for _, b := range edges[i:] {
			n := shardCounts[k%len(shardCounts)]
			k++
			emit(a, b, n)
			if a != b {
				emit(b, a, n)
			}
		}
	}
	// Ids outside the API's 1..2^63-1 domain: uint64() of a negative Go int
	// is its two's complement; the Python port claims the same behaviour.
	for _, a := range []int64{0, -1, -2, math.MinInt64} {
		for _, b := range []int64{0, 1, math.MaxInt64} {
			n := shardCounts[k%len(shardCounts)]
			k++
			emit(a, b, n)
			emit(b, a, n)
		}
	}

	// Pseudo-random pairs: over the whole positive int64 range, and over
	// small ranges (typical auto-increment user ids). Both orders each time.
	rng := rand.New(rand.NewSource(seed))
	positive := func() int64 { return rng.Int63n(math.MaxInt64) + 1 } // 1..MaxInt64
	ranges := []int64{10, 1000, 1 << 20, 1 << 31}
	for i := 0; i < 1500; i++ {
		var a, b int64
		if i%2 == 0 {
			a, b = positive(), positive()
		} else {
			r := ranges[(i/2)%len(ranges)]
			a, b = rng.Int63n(r)+1, rng.Int63n(r)+1
		}
		n := shardCounts[rng.Intn(len(shardCounts))]
		emit(a, b, n)
		emit(b, a, n)
	}

	os.Stdout.WriteString("[\n")
	for i, v := range out {
		line, err := json.Marshal(v)
		if err != nil {
			panic(err)
		}
		os.Stdout.Write(line)
		if i < len(out)-1 {
			os.Stdout.WriteString(",")
		}
		os.Stdout.WriteString("\n")
	}
	os.Stdout.WriteString("]\n")
}
