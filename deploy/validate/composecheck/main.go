// composecheck loads a Compose file with compose-go, the library `docker compose` itself
// uses: YAML parsing, interpolation of ${VAR:-default}, the compose-spec JSON schema,
// normalisation and the consistency checks (undefined services in depends_on, undefined
// volumes/networks, ...). It prints the resolved project like `docker compose config`
// and exits non-zero on the first error. No Docker engine needed.
//
//	go run . path/to/docker-compose.yml [KEY=VALUE ...]
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: composecheck FILE [KEY=VALUE ...]")
		os.Exit(2)
	}
	opts, err := cli.NewProjectOptions(
		[]string{os.Args[1]},
		cli.WithEnv(os.Args[2:]),
		cli.WithResolvedPaths(true),
		cli.WithConsistency(true),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "composecheck:", err)
		os.Exit(1)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintf(os.Stderr, "composecheck: %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	out, err := project.MarshalYAML()
	if err != nil {
		fmt.Fprintln(os.Stderr, "composecheck:", err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}
