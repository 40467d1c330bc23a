// kstatus: computes a Kubernetes object's status the way Flux does (Flux's fork of kstatus,
// github.com/fluxcd/cli-utils, which kustomize-controller's health checks run), for the tests of
// LlamaDeployment conditions. Reads one object as JSON on stdin and prints
// {"status": "Current|InProgress|Failed|…", "message": "…"}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/fluxcd/cli-utils/pkg/kstatus/status"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// The unstructured JSON decoder keeps integers as int64, as the API machinery does.
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(data); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	res, err := status.Compute(u)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := json.Marshal(map[string]string{"status": res.Status.String(), "message": res.Message})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(string(out))
}
