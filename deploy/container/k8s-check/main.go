// k8s-check: reads rendered Kubernetes manifests (kubectl kustomize output) on stdin and decodes
// each document strictly into the Kubernetes API type of its apiVersion and kind, as an API
// server would: an unknown or misplaced field, a wrong type, or a kind this project does not
// ship is an error. No cluster needed. Used by tests/container_real.rs.
package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

func target(apiVersion, kind string) any {
	switch apiVersion + "/" + kind {
	case "apps/v1/Deployment":
		return &appsv1.Deployment{}
	case "apps/v1/StatefulSet":
		return &appsv1.StatefulSet{}
	case "v1/Service":
		return &corev1.Service{}
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}
	case "v1/Secret":
		return &corev1.Secret{}
	case "v1/PersistentVolumeClaim":
		return &corev1.PersistentVolumeClaim{}
	}
	return nil
}

func main() {
	in, err := io.ReadAll(bufio.NewReader(os.Stdin))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	failed := 0
	n := 0
	for _, doc := range bytes.Split(in, []byte("\n---\n")) {
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		n++
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil {
			fmt.Printf("document %d: not YAML: %v\n", n, err)
			failed++
			continue
		}
		what := fmt.Sprintf("%s %s (%s)", head.Kind, head.Metadata.Name, head.APIVersion)
		obj := target(head.APIVersion, head.Kind)
		if obj == nil {
			fmt.Printf("%s: no schema here for this kind\n", what)
			failed++
			continue
		}
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			fmt.Printf("%s: %v\n", what, strings.TrimSpace(err.Error()))
			failed++
			continue
		}
		fmt.Printf("%s: ok\n", what)
	}
	if n == 0 {
		fmt.Println("no documents")
		os.Exit(1)
	}
	if failed > 0 {
		os.Exit(1)
	}
}
