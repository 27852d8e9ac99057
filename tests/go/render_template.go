// Renders an Ollama Modelfile's TEMPLATE with Go's text/template, the engine Ollama uses, for the messages in
// the JSON file given: `go run render_template.go Modelfile messages.json`. Ollama passes the Modelfile's SYSTEM
// as the first message when a request has none; the caller does the same.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	modelfile, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	text := string(modelfile)
	start := strings.Index(text, "TEMPLATE \"\"\"")
	if start < 0 {
		fmt.Fprintln(os.Stderr, "no TEMPLATE in the Modelfile")
		os.Exit(2)
	}
	body := text[start+len("TEMPLATE \"\"\""):]
	body = body[:strings.Index(body, "\"\"\"")]
	raw, err := os.ReadFile(os.Args[2])
	if err != nil {
		panic(err)
	}
	var messages []Message
	if err := json.Unmarshal(raw, &messages); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(body))
	if err := tmpl.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil {
		panic(err)
	}
}
